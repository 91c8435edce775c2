//! A fixed ring of staging buffers, allocated once. Host memory used for loading is bounded by
//! the ring, not by the model. A slot goes back to the ring when dropped, wherever that happens
//! (after its upload, or on an error path), so slots cannot leak.
//!
//! On GPU backends these are pinned host buffers (the copy engine reads them directly); on the CPU
//! they are plain heap buffers.

use std::sync::Arc;
use std::time::Duration;

struct RingShared {
    free_tx: flume::Sender<Box<[u8]>>,
    free_rx: flume::Receiver<Box<[u8]>>,
    slot_size: usize,
    n_slots: usize,
}

#[derive(Clone)]
pub struct StagingRing {
    shared: Arc<RingShared>,
}

/// One borrowed staging buffer; `len` bytes of it are valid.
pub struct StagingSlot {
    buf: Option<Box<[u8]>>,
    pub len: usize,
    home: flume::Sender<Box<[u8]>>,
}

impl StagingSlot {
    pub fn data(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[..self.len],
            None => &[],
        }
    }

    /// The whole buffer, for filling; set `len` afterwards.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => b,
            None => &mut [],
        }
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
    pub fn new(n_slots: usize, slot_size: usize) -> Self {
        // Capacity n_slots: every buffer fits back, so a returning `try_send` cannot fail.
        let (free_tx, free_rx) = flume::bounded(n_slots);
        for _ in 0..n_slots {
            let _ = free_tx.try_send(vec![0u8; slot_size].into_boxed_slice());
        }
        Self {
            shared: Arc::new(RingShared {
                free_tx,
                free_rx,
                slot_size,
                n_slots,
            }),
        }
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

    /// Waits for a free slot; `None` once `cancelled()` turns true.
    pub fn acquire(&self, cancelled: impl Fn() -> bool) -> Option<StagingSlot> {
        loop {
            if cancelled() {
                return None;
            }
            // The timeout bounds how late cancellation is noticed.
            match self.shared.free_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(buf) => {
                    return Some(StagingSlot {
                        buf: Some(buf),
                        len: 0,
                        home: self.shared.free_tx.clone(),
                    })
                }
                Err(flume::RecvTimeoutError::Timeout) => continue,
                Err(flume::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_on_drop() {
        let ring = StagingRing::new(2, 16);
        let a = ring.acquire(|| false).unwrap();
        let b = ring.acquire(|| false).unwrap();
        assert_eq!(ring.free_slots(), 0);
        // Empty ring + cancellation: returns instead of hanging.
        assert!(ring.acquire(|| true).is_none());
        drop(a);
        drop(b);
        assert_eq!(ring.free_slots(), 2);
    }
}
