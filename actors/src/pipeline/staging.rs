//! A fixed ring of staging buffers, allocated once. Host memory used for loading is bounded by
//! the ring, not by the model. A slot goes back to the ring when dropped, wherever that happens
//! (after its upload, or on an error path), so slots cannot leak.
//!
//! On GPU backends these are pinned host buffers (the copy engine reads them directly; see
//! `WeightBackend::alloc_staging`); on the CPU they are plain heap buffers.

use std::any::Any;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The memory behind one staging slot.
pub trait SlotMemory: Send + Sync + 'static {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The concrete type (a GPU backend takes its pinned buffer back out to queue a copy).
    fn as_any(&self) -> &dyn Any;
}

impl SlotMemory for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

type SlotBuf = Box<dyn SlotMemory>;

struct RingShared {
    free_tx: flume::Sender<SlotBuf>,
    free_rx: flume::Receiver<SlotBuf>,
    slot_size: usize,
    n_slots: usize,
}

#[derive(Clone)]
pub struct StagingRing {
    shared: Arc<RingShared>,
}

/// One borrowed staging buffer; `len` bytes of it are valid.
pub struct StagingSlot {
    buf: Option<SlotBuf>,
    pub len: usize,
    home: flume::Sender<SlotBuf>,
}

impl StagingSlot {
    pub fn data(&self) -> &[u8] {
        match &self.buf {
            Some(b) => b.bytes().get(..self.len).unwrap_or(&[]),
            None => &[],
        }
    }

    /// The whole buffer, for filling; set `len` afterwards.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => b.bytes_mut(),
            None => &mut [],
        }
    }

    /// The slot's memory, for a backend that needs its concrete type (pinned buffers).
    pub fn memory(&self) -> Option<&dyn SlotMemory> {
        self.buf.as_deref()
    }
}

impl Drop for StagingSlot {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            // The channel holds exactly `n_slots` buffers, so returning one never finds it full;
            // after shutdown the receiver may be gone and the buffer is simply freed.
            let _ = self.home.try_send(b);
        }
    }
}

impl StagingRing {
    /// A ring of heap buffers (the CPU backend).
    pub fn new(n_slots: usize, slot_size: usize) -> Self {
        let heap = |n: usize,
                    size: usize|
         -> std::result::Result<Vec<SlotBuf>, std::convert::Infallible> {
            Ok((0..n)
                .map(|_| Box::new(vec![0u8; size].into_boxed_slice()) as SlotBuf)
                .collect())
        };
        match Self::with_memory(n_slots, slot_size, heap) {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// A ring whose `n_slots` buffers come from `alloc(n_slots, slot_size)` (pinned memory on
    /// GPUs), all allocated here, once.
    pub fn with_memory<E>(
        n_slots: usize,
        slot_size: usize,
        alloc: impl FnOnce(usize, usize) -> std::result::Result<Vec<SlotBuf>, E>,
    ) -> std::result::Result<Self, E> {
        let bufs = if n_slots == 0 {
            Vec::new()
        } else {
            alloc(n_slots, slot_size)?
        };
        let n_slots = bufs.len();
        // Capacity n_slots: every buffer fits back, so a returning `try_send` cannot fail.
        let (free_tx, free_rx) = flume::bounded(n_slots);
        for b in bufs {
            let _ = free_tx.try_send(b);
        }
        Ok(Self {
            shared: Arc::new(RingShared {
                free_tx,
                free_rx,
                slot_size,
                n_slots,
            }),
        })
    }

    pub fn slot_size(&self) -> usize {
        self.shared.slot_size
    }

    pub fn n_slots(&self) -> usize {
        self.shared.n_slots
    }

    /// Slots currently in the ring (not lent out).
    pub fn free_slots(&self) -> usize {
        self.shared.free_rx.len()
    }

    /// Waits for a free slot; `None` once `cancel` fires.
    pub fn acquire(&self, cancel: &CancellationToken) -> Option<StagingSlot> {
        let buf = crate::pipeline::shared::recv_or_cancel(&self.shared.free_rx, cancel)?;
        Some(StagingSlot {
            buf: Some(buf),
            len: 0,
            home: self.shared.free_tx.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_on_drop() {
        let ring = StagingRing::new(2, 16);
        let live = CancellationToken::new();
        let a = ring.acquire(&live).unwrap();
        let b = ring.acquire(&live).unwrap();
        assert_eq!(ring.free_slots(), 0);
        // Empty ring + cancellation: returns instead of hanging.
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        assert!(ring.acquire(&cancelled).is_none());
        drop(a);
        drop(b);
        assert_eq!(ring.free_slots(), 2);
    }
}
