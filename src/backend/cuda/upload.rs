//! The pinned upload ring: a fixed set of pinned host slots (allocated once, not zeroed), several
//! copy streams and one event per slot. Host threads fill a slot with positional reads (`pread`)
//! of the model file straight into pinned memory (page cache or disk; no page faults of the
//! mapping, which capped 8 threads at ~14 GB/s), falling back to copies from the mapping when the
//! file cannot be opened. Several uploads are packed into one slot; each gets its own async copy
//! on a copy stream and the slot's event is recorded after them; a slot is refilled only after
//! that event completed. Layers become ready on the device through events the compute stream
//! waits on (`cuStreamWaitEvent`): the host never waits for an upload except to reuse a slot.

use super::memory::PinnedBuf;
use super::stream::{Event, Stream};
use super::CudaDevice;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{ComputeDevice, DeviceBuffer, DeviceEvent, DeviceStream};
use rayon::prelude::*;
use std::fs::File;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Ring geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    pub slots: usize,
    pub slot_bytes: usize,
    pub copy_streams: usize,
    /// Host threads filling one slot (one thread reads ~9 GB/s from the page cache).
    pub fill_threads: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        // 4 x 64 MiB: a slot's copy (1.2 ms at 55 GB/s) finishes before the next slot is
        // filled, so more slots only cost pinning time at start.
        Self {
            slots: 4,
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
    /// Host time reading source bytes into pinned slots (`pread`, or copies from the mapping).
    pub fill_s: f64,
    /// Host time waiting for a slot's previous copy to complete.
    pub wait_s: f64,
    /// Host time queueing copies and events.
    pub queue_s: f64,
    /// Time allocating the ring (pinned slots, streams, events, threads).
    pub ring_alloc_s: f64,
    /// Whether slots were filled with `pread` (true) or from the mapping (false).
    pub pread: bool,
}

/// A device destination range of an upload (the owner keeps the memory alive).
#[derive(Debug, Clone, Copy)]
pub struct DevRange {
    pub ptr: u64,
    pub len: usize,
}

impl DeviceBuffer for DevRange {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
}

/// One upload: `src` (byte range of the model file / its mapping) to `dst` at `dst_off`.
#[derive(Debug, Clone)]
pub struct UploadItem {
    pub src: Range<usize>,
    pub dst: DevRange,
    pub dst_off: usize,
}

struct Slot {
    buf: PinnedBuf,
    done: Event,
    in_flight: bool,
}

/// A piece of a slot: `len` source bytes at `src` into the slot at `slot_off`, then copied to
/// `dst` at `dst_off`.
struct Piece {
    src: usize,
    len: usize,
    slot_off: usize,
    dst: DevRange,
    dst_off: usize,
}

pub struct PinnedRing {
    slots: Vec<Slot>,
    streams: Vec<Stream>,
    next: usize,
    pool: rayon::ThreadPool,
    file: Option<File>,
    pub stats: UploadStats,
}

/// Sub-piece size for the fill threads: large enough for long sequential reads, small enough to
/// spread a 64 MiB slot over 8+ threads.
const READ_PIECE: usize = 4 << 20;

impl PinnedRing {
    pub fn new(dev: &CudaDevice, cfg: RingConfig) -> BackendResult<Self> {
        let t = Instant::now();
        let slots = (0..cfg.slots.max(2))
            .map(|_| {
                Ok(Slot {
                    buf: dev.alloc_pinned_unzeroed(cfg.slot_bytes.max(1 << 20))?,
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
            .map_err(|e| BackendError::InvalidArgument {
                op: "PinnedRing::new",
                what: format!("upload thread pool: {e}"),
            })?;
        Ok(Self {
            slots,
            streams,
            next: 0,
            pool,
            file: None,
            stats: UploadStats {
                ring_alloc_s: t.elapsed().as_secs_f64(),
                ..UploadStats::default()
            },
        })
    }

    /// Reads sources from `file` with `pread` from now on (`None`: copies from the mapping).
    /// The file must hold the same bytes as the mapping passed to [`PinnedRing::upload_many`].
    pub fn set_source_file(&mut self, file: Option<File>) {
        self.stats.pread = file.is_some();
        self.file = file;
    }

    pub fn slot_bytes(&self) -> usize {
        self.slots[0].buf.len()
    }

    /// Pinned bytes held by the ring.
    pub fn pinned_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.buf.len()).sum()
    }

    /// Queues the upload of `map[src]` to `dst` at `dst_off`; see [`PinnedRing::upload_many`].
    pub fn upload(
        &mut self,
        map: &[u8],
        src: Range<usize>,
        dst: &impl DeviceBuffer,
        dst_off: usize,
    ) -> BackendResult<()> {
        let dst = DevRange {
            ptr: dst.device_ptr(),
            len: dst.len_bytes(),
        };
        self.upload_many(map, &[UploadItem { src, dst, dst_off }])
    }

    /// Queues every item, packing them into slots. Returns once every byte sits in a pinned slot
    /// with its copy queued; each `dst` must stay alive until `mark_ready`'s events completed
    /// (the caller owns device memory for the model's lifetime). `map` is the mapped model file
    /// (the source when no file is set, and the bounds check for every item).
    pub fn upload_many(&mut self, map: &[u8], items: &[UploadItem]) -> BackendResult<()> {
        let slot_bytes = self.slot_bytes();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut used = 0usize;
        for it in items {
            if it.src.start > it.src.end || it.src.end > map.len() {
                return Err(BackendError::InvalidArgument {
                    op: "PinnedRing::upload_many",
                    what: format!("source {:?} outside the file ({} bytes)", it.src, map.len()),
                });
            }
            let mut at = it.src.start;
            while at < it.src.end {
                if used == slot_bytes {
                    self.flush(map, &mut pieces)?;
                    used = 0;
                }
                let len = (it.src.end - at).min(slot_bytes - used);
                pieces.push(Piece {
                    src: at,
                    len,
                    slot_off: used,
                    dst: it.dst,
                    dst_off: it.dst_off + (at - it.src.start),
                });
                used += len;
                at += len;
            }
        }
        if !pieces.is_empty() {
            self.flush(map, &mut pieces)?;
        }
        Ok(())
    }

    /// Fills the next slot with `pieces` (all threads), queues their copies and the slot's event.
    fn flush(&mut self, map: &[u8], pieces: &mut Vec<Piece>) -> BackendResult<()> {
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
        // Sub-pieces for the fill threads: (source offset, length, slot offset).
        let mut tasks = Vec::new();
        for p in pieces.iter() {
            let mut o = 0;
            while o < p.len {
                let n = (p.len - o).min(READ_PIECE);
                tasks.push((p.src + o, n, p.slot_off + o));
                o += n;
            }
        }
        // The slot's address crosses threads as an integer: every task writes a disjoint range.
        let base = slot.buf.host_ptr_mut() as usize;
        let file = self.file.as_ref();
        self.pool.install(|| {
            tasks.par_iter().try_for_each(|&(src, len, off)| {
                // SAFETY: `off + len <= slot_bytes` (pieces are packed within the slot), ranges
                // of different tasks are disjoint, and the slot is not in flight (waited above)
                // and is exclusively borrowed through `slot` for this call.
                unsafe { fill(file, map, src, (base as *mut u8).add(off), len) }
            })
        })?;
        self.stats.fill_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for p in pieces.iter() {
            // SAFETY: the slot stays alive (owned by the ring) and is not written again until
            // `done` (recorded right after these copies on the same stream) has completed; `dst`
            // outlives the copy per `upload_many`'s contract.
            unsafe { stream.copy_htod_async(&p.dst, p.dst_off, &slot.buf, p.slot_off, p.len)? };
            self.stats.bytes += p.len as u64;
        }
        stream.record(&slot.done)?;
        slot.in_flight = true;
        self.stats.queue_s += t.elapsed().as_secs_f64();
        pieces.clear();
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

/// Writes `len` bytes of the source at `src` to `dst`: `pread` from `file`, else a copy from
/// `map` (bounds checked by the caller).
///
/// # Safety
/// `dst` must be valid for `len` writes that no other thread touches during the call.
unsafe fn fill(
    file: Option<&File>,
    map: &[u8],
    src: usize,
    dst: *mut u8,
    len: usize,
) -> BackendResult<()> {
    let Some(f) = file else {
        // SAFETY: `map[src..src + len]` is in bounds (checked in `upload_many`); `dst` per the
        // contract; the two never overlap (pinned slot vs file mapping).
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(src), dst, len) };
        return Ok(());
    };
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < len {
        // SAFETY: `dst + done` is valid for `len - done` writes per the contract; the fd is open
        // for the life of `f`.
        let r = unsafe {
            libc::pread(
                f.as_raw_fd(),
                dst.add(done).cast(),
                len - done,
                (src + done) as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BackendError::WeightRead {
                offset: src + done,
                len: len - done,
                source: e,
            });
        }
        if r == 0 {
            return Err(BackendError::WeightRead {
                offset: src + done,
                len: len - done,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        done += r as usize;
    }
    Ok(())
}
