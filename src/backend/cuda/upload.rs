//! The pinned upload ring: a fixed set of pinned host slots (allocated once), several copy
//! streams and one event per slot. Host threads fill a slot straight from the source bytes (the
//! mapped file: page cache or disk), the slot's copy is queued on a copy stream and its event
//! recorded; a slot is refilled only after that event completed. Layers become ready on the
//! device through events the compute stream waits on (`cuStreamWaitEvent`): the host never waits
//! for an upload except to reuse a slot.

use super::memory::PinnedBuf;
use super::stream::{Event, Stream};
use super::CudaDevice;
use crate::backend::error::BackendResult;
use crate::backend::{ComputeDevice, DeviceBuffer, DeviceEvent, DeviceStream};
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Ring geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    pub slots: usize,
    pub slot_bytes: usize,
    pub copy_streams: usize,
    /// Host threads filling one slot (one thread copies ~13 GB/s from the page cache).
    pub fill_threads: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            slots: 8,
            slot_bytes: 64 << 20,
            copy_streams: 2,
            fill_threads: 8,
        }
    }
}

/// Where upload time went (host side).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct UploadStats {
    pub bytes: u64,
    /// Host time copying source bytes into pinned slots (page faults of the mapping included).
    pub fill_s: f64,
    /// Host time waiting for a slot's previous copy to complete.
    pub wait_s: f64,
    /// Host time queueing copies and events.
    pub queue_s: f64,
}

struct Slot {
    buf: PinnedBuf,
    done: Event,
    in_flight: bool,
}

pub struct PinnedRing {
    slots: Vec<Slot>,
    streams: Vec<Stream>,
    /// One "layer ready" event per copy stream, recorded by `mark_ready`.
    next: usize,
    pool: rayon::ThreadPool,
    pub stats: UploadStats,
}

impl PinnedRing {
    pub fn new(dev: &CudaDevice, cfg: RingConfig) -> BackendResult<Self> {
        let slots = (0..cfg.slots.max(2))
            .map(|_| {
                Ok(Slot {
                    buf: dev.alloc_pinned(cfg.slot_bytes.max(1 << 20))?,
                    done: dev.new_event(false)?,
                    in_flight: false,
                })
            })
            .collect::<BackendResult<Vec<_>>>()?;
        let streams = (0..cfg.copy_streams.max(1))
            .map(|_| dev.new_stream())
            .collect::<BackendResult<Vec<_>>>()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.fill_threads.max(1))
            .thread_name(|i| format!("rf-upload-{i}"))
            .build()
            .map_err(|e| crate::backend::error::BackendError::InvalidArgument {
                op: "PinnedRing::new",
                what: format!("upload thread pool: {e}"),
            })?;
        Ok(Self {
            slots,
            streams,
            next: 0,
            pool,
            stats: UploadStats::default(),
        })
    }

    pub fn slot_bytes(&self) -> usize {
        self.slots[0].buf.len()
    }

    /// Pinned bytes held by the ring.
    pub fn pinned_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.buf.len()).sum()
    }

    /// Queues the upload of `src` to `dst` at `dst_off`, slot by slot. Returns once every byte
    /// sits in a pinned slot with its copy queued; `dst` must stay alive until `mark_ready`'s
    /// events completed (the caller owns device memory for the model's lifetime).
    pub fn upload(
        &mut self,
        src: &[u8],
        dst: &impl DeviceBuffer,
        dst_off: usize,
    ) -> BackendResult<()> {
        let slot_bytes = self.slot_bytes();
        for (i, chunk) in src.chunks(slot_bytes).enumerate() {
            let si = self.next % self.slots.len();
            let stream = &self.streams[self.next % self.streams.len()];
            self.next += 1;
            let slot = &mut self.slots[si];
            if slot.in_flight {
                let t = Instant::now();
                slot.done.synchronize()?;
                slot.in_flight = false;
                self.stats.wait_s += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let dst_slice = &mut slot.buf.as_mut_slice()[..chunk.len()];
            // Several threads fill one slot: one thread is bound near 13 GB/s by page faults
            // and memcpy, the copy engine takes 55 GB/s.
            let piece = chunk
                .len()
                .div_ceil(self.pool.current_num_threads())
                .max(1 << 20);
            self.pool.install(|| {
                dst_slice
                    .par_chunks_mut(piece)
                    .zip(chunk.par_chunks(piece))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            });
            self.stats.fill_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            // SAFETY: the slot stays alive (owned by the ring) and is not written again until
            // `done` (recorded right after the copy on the same stream) has completed; `dst`
            // outlives the copy per this method's contract.
            unsafe {
                stream.copy_htod_async(dst, dst_off + i * slot_bytes, &slot.buf, 0, chunk.len())?
            };
            stream.record(&slot.done)?;
            slot.in_flight = true;
            self.stats.queue_s += t.elapsed().as_secs_f64();
            self.stats.bytes += chunk.len() as u64;
        }
        Ok(())
    }

    /// Makes `compute` wait (on the device) for every copy queued so far.
    pub fn mark_ready(&self, compute: &Stream, events: &[Event]) -> BackendResult<()> {
        for (s, e) in self.streams.iter().zip(events) {
            s.record(e)?;
            compute.wait(e)?;
        }
        Ok(())
    }

    pub fn copy_streams(&self) -> usize {
        self.streams.len()
    }

    /// Makes every copy stream wait for `ev` (recorded on the compute stream) before the copies
    /// queued after this call: a streamed layer's device slot is overwritten only after the
    /// compute that read it finished.
    pub fn wait_for(&self, ev: &Event) -> BackendResult<()> {
        for s in &self.streams {
            s.wait(ev)?;
        }
        Ok(())
    }

    /// Blocks until every queued copy finished.
    pub fn drain(&mut self) -> BackendResult<Duration> {
        let t = Instant::now();
        for s in &mut self.slots {
            if s.in_flight {
                s.done.synchronize()?;
                s.in_flight = false;
            }
        }
        Ok(t.elapsed())
    }
}
