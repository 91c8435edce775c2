//! The pinned upload ring: a fixed set of pinned host slots (allocated once, not zeroed), several
//! copy streams and one event per slot. Host threads fill a slot with positional reads (`pread`)
//! of the model file straight into pinned memory (page cache or disk; no page faults of the
//! mapping, which capped 8 threads at ~14 GB/s), falling back to copies from the mapping when the
//! file cannot be opened. Several uploads are packed into one slot; each gets its own async copy
//! on a copy stream and the slot's event is recorded after them; a slot is refilled only after
//! that event completed. Layers become ready on the device through events the compute stream
//! waits on (`cuStreamWaitEvent`): the host never waits for an upload except to reuse a slot.
//!
//! - `loading.rs`   — [`LoadingRing`]: the ring on a loader thread, one event per upload group.
//! - `readahead.rs` — [`spawn_readahead`]: page-cache readahead of the model file (cold start).

use super::memory::PinnedBuf;
use super::stream::{Event, Stream};
use super::CudaDevice;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{ComputeDevice, DeviceBuffer, DeviceEvent, DeviceStream};
use rayon::prelude::*;
use std::fs::File;
use std::ops::Range;
use std::time::{Duration, Instant};

mod loading;
mod readahead;

pub use loading::{GroupSender, LoadProgressWaiter, LoadingRing};
pub use readahead::spawn_readahead;

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
        // 4 x 16 MiB: a slot's copy (0.3 ms at 55 GB/s) finishes before the next slot is
        // filled (0.5 ms at 34 GB/s), so more or larger slots only cost pinning time, which is
        // on the start-up path right after CUDA init (H100: 31 ms for 4 x 16 MiB, 68 ms for
        // 4 x 32 MiB). 12 fill threads: one thread copies ~3 GB/s out of the page cache into
        // pinned memory (H100: 8 threads 32-33 GB/s, 12 threads 34-40, 16 threads 35-37).
        let cfg = Self {
            slots: 4,
            slot_bytes: 16 << 20,
            copy_streams: 2,
            fill_threads: 12,
        };
        cfg.with_env_overrides()
    }
}

impl RingConfig {
    /// `ROCMFORGE_UPLOAD_THREADS`, `ROCMFORGE_UPLOAD_SLOTS` and `ROCMFORGE_UPLOAD_SLOT_MIB`
    /// override the geometry (tuning on a new machine without a rebuild; unparsable values
    /// are ignored).
    pub fn with_env_overrides(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        if let Some(n) = var("ROCMFORGE_UPLOAD_THREADS").filter(|&n| n > 0) {
            self.fill_threads = n;
        }
        if let Some(n) = var("ROCMFORGE_UPLOAD_SLOTS").filter(|&n| n >= 2) {
            self.slots = n;
        }
        if let Some(n) = var("ROCMFORGE_UPLOAD_SLOT_MIB").filter(|&n| n > 0) {
            self.slot_bytes = n << 20;
        }
        self
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
    /// Background load ([`LoadingRing`]): seconds from the start of the load until the first
    /// group (the embedding table) and the last group had their copies queued.
    pub first_group_s: f64,
    pub queued_s: f64,
    /// Background load: seconds from the start of the load until every copy completed (the
    /// loader drains the ring before it ends; 0 when it did not finish).
    pub resident_s: f64,
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

/// Fill tasks are split at this granularity (page size: `pread` into pinned memory wants no
/// partial pages per thread, and the page cache works in pages).
const TASK_ALIGN: usize = 4096;

impl PinnedRing {
    pub fn new(dev: &CudaDevice, cfg: RingConfig) -> BackendResult<Self> {
        let t = Instant::now();
        // One thread per slot: pinning is most of the ring's cost (~0.6 ms per MiB, page
        // zeroing by the kernel and DMA mapping) and sits on the start-up path right after
        // CUDA init.
        let slot = || -> BackendResult<Slot> {
            Ok(Slot {
                buf: dev.alloc_pinned_unzeroed(cfg.slot_bytes.max(1 << 20))?,
                done: dev.new_event(false)?,
                in_flight: false,
            })
        };
        let slots = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..cfg.slots.max(2)).map(|_| sc.spawn(slot)).collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BackendError::PinnedAlloc {
                            requested: cfg.slot_bytes,
                            reason: "the allocating thread panicked".into(),
                        })
                    })
                })
                .collect::<BackendResult<Vec<_>>>()
        })?;
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
        if let Some(f) = &file {
            use std::os::fd::AsRawFd;
            // The weights are read front to back: a larger readahead window from a cold cache.
            // Advice only: a failure changes nothing but speed.
            // SAFETY: plain syscall on an open descriptor; no memory is passed.
            let _ =
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
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
        let tasks = split_tasks(pieces, self.pool.current_num_threads());
        // The slot's address crosses threads as an integer: every task writes a disjoint range.
        let base = slot.buf.host_ptr_mut() as usize;
        let file = self.file.as_ref();
        self.pool.install(|| {
            tasks.par_iter().try_for_each(|task| {
                task.iter().try_for_each(|&(src, len, off)| {
                    // SAFETY: `off + len <= slot_bytes` (pieces are packed within the slot),
                    // ranges of different tasks are disjoint, and the slot is not in flight
                    // (waited above) and is exclusively borrowed through `slot` for this call.
                    unsafe { fill(file, map, src, (base as *mut u8).add(off), len) }
                })
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

    /// Records `events[s]` on copy stream `s`: once all completed, every copy queued so far
    /// has landed.
    pub fn record_all(&self, events: &[Event]) -> BackendResult<()> {
        for (s, e) in self.streams.iter().zip(events) {
            s.record(e)?;
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

impl Drop for PinnedRing {
    fn drop(&mut self) {
        // The slots must not be unpinned under a copy still reading them.
        if let Err(e) = self.drain() {
            tracing::warn!(error = %e, "draining the upload ring failed");
        }
    }
}

/// One fill task: (source offset, length, slot offset) runs.
type FillTask = Vec<(usize, usize, usize)>;

/// Splits a slot's pieces into about `threads` tasks of equal bytes (a barrier ends each slot,
/// so equal shares keep every thread busy until the end; 4 MiB tasks over a 64 MiB slot and
/// 12 threads left two thirds of them idle in the second round).
fn split_tasks(pieces: &[Piece], threads: usize) -> Vec<FillTask> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let share = total.div_ceil(threads.max(1)).div_ceil(TASK_ALIGN).max(1) * TASK_ALIGN;
    let mut tasks = Vec::new();
    let mut cur: FillTask = Vec::new();
    let mut room = share;
    for p in pieces {
        let mut o = 0;
        while o < p.len {
            let n = (p.len - o).min(room);
            cur.push((p.src + o, n, p.slot_off + o));
            o += n;
            room -= n;
            if room == 0 {
                tasks.push(std::mem::take(&mut cur));
                room = share;
            }
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    tasks
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

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(src: usize, len: usize, slot_off: usize) -> Piece {
        Piece {
            src,
            len,
            slot_off,
            dst: DevRange { ptr: 0, len: 0 },
            dst_off: 0,
        }
    }

    /// Tasks cover every byte of every piece exactly once, source and slot offsets move
    /// together, and no task is much larger than an even share.
    #[test]
    fn split_tasks_covers_each_byte_once_in_even_shares() {
        let pieces = vec![
            piece(1000, 16 << 10, 0),
            piece(90_000, (20 << 20) + 123, 16 << 10),
            piece(50_000_000, 12 << 20, (16 << 10) + (20 << 20) + 123),
        ];
        let total: usize = pieces.iter().map(|p| p.len).sum();
        for threads in [1, 3, 8, 12, 16] {
            let tasks = split_tasks(&pieces, threads);
            assert!(tasks.len() <= threads, "{threads}: {} tasks", tasks.len());
            let mut covered = vec![0u8; total];
            for t in &tasks {
                let bytes: usize = t.iter().map(|r| r.1).sum();
                assert!(
                    bytes <= total.div_ceil(threads) + TASK_ALIGN,
                    "{threads}: {bytes}"
                );
                for &(src, len, off) in t {
                    let p = pieces
                        .iter()
                        .find(|p| off >= p.slot_off && off < p.slot_off + p.len)
                        .expect("run inside a piece");
                    assert_eq!(
                        src - p.src,
                        off - p.slot_off,
                        "source and slot offsets agree"
                    );
                    assert!(off + len <= p.slot_off + p.len, "run stays in its piece");
                    covered[off..off + len].iter_mut().for_each(|c| *c += 1);
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{threads}: each byte once");
        }
    }

    #[test]
    fn split_tasks_of_nothing_is_empty() {
        assert!(split_tasks(&[], 8).is_empty());
    }
}
