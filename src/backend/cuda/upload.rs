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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
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

/// The ring, possibly still filling the resident weights on a background thread.
///
/// [`LoadingRing::spawn`] moves the ring to a loader thread that uploads groups in order as
/// the owner sends them through the returned [`GroupSender`] (for the forward pass: the
/// embedding table, each resident layer, the output head; the owner sends a layer as soon as
/// its device memory is allocated, so reading starts before the last allocation) and records
/// one event per copy stream after each group. The compute thread calls
/// [`LoadingRing::wait_group`] before using a group: it blocks the host only until that group's
/// copies are *queued* (an event must be recorded before a stream can wait on it), then makes
/// the compute stream wait on the device. So layer 0 computes while later layers are still read
/// and copied, and the first forward is queued long before the last byte is read.
pub struct LoadingRing {
    state: LoadState,
    shared: Option<Arc<LoadShared>>,
}

enum LoadState {
    Loading(JoinHandle<BackendResult<PinnedRing>>),
    Ready(PinnedRing),
    /// The loader failed; its error went to the first caller that joined it.
    Failed(String),
    /// Transient, while joining.
    Joining,
}

struct LoadProgress {
    /// Groups whose copies and events are queued.
    queued: usize,
    /// The loader ended (done, failed or cancelled); no further group will be queued.
    ended: bool,
}

struct LoadShared {
    progress: Mutex<LoadProgress>,
    changed: Condvar,
    /// `events[g][s]`: recorded on copy stream `s` once group `g`'s copies are queued.
    events: Vec<Vec<Event>>,
    cancel: AtomicBool,
}

impl LoadShared {
    fn lock(&self) -> MutexGuard<'_, LoadProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LoadingRing {
    /// A ring with nothing loading (every wait returns at once).
    pub fn ready(ring: PinnedRing) -> Self {
        Self {
            state: LoadState::Ready(ring),
            shared: None,
        }
    }

    /// Starts the loader thread for `n_groups` groups, uploaded in the order they are sent.
    /// `src` holds the bytes the items index (the mapped model file: the bounds check, and the
    /// source when the ring has no file). Every `dst` must stay alive until this value is
    /// dropped or joined and drained (the owner of the device memory drops it after this).
    /// `t0` is the start of the load (for the `first_group_s`/`queued_s` stats).
    pub fn spawn<S>(
        dev: &CudaDevice,
        ring: PinnedRing,
        src: S,
        n_groups: usize,
        t0: Instant,
    ) -> BackendResult<(Self, GroupSender)>
    where
        S: AsRef<[u8]> + Send + 'static,
    {
        let events = (0..n_groups)
            .map(|_| {
                (0..ring.copy_streams())
                    .map(|_| dev.new_event(false))
                    .collect::<BackendResult<Vec<_>>>()
            })
            .collect::<BackendResult<Vec<_>>>()?;
        let shared = Arc::new(LoadShared {
            progress: Mutex::new(LoadProgress {
                queued: 0,
                ended: false,
            }),
            changed: Condvar::new(),
            events,
            cancel: AtomicBool::new(false),
        });
        // Capacity: every group fits, so the owner never blocks on a send.
        let (tx, rx) = mpsc::sync_channel(n_groups.max(1));
        let sh = Arc::clone(&shared);
        let ctx = Arc::clone(&dev.ctx);
        let thread = std::thread::Builder::new()
            .name("rf-loader".into())
            .spawn(move || {
                let mut ring = ring;
                let r = super::bind(&ctx).and_then(|()| load_groups(&mut ring, &src, &rx, &sh, t0));
                let mut p = sh.lock();
                p.ended = true;
                drop(p);
                sh.changed.notify_all();
                r.map(|()| ring)
            })
            .map_err(|e| BackendError::InvalidArgument {
                op: "LoadingRing::spawn",
                what: format!("loader thread: {e}"),
            })?;
        Ok((
            Self {
                state: LoadState::Loading(thread),
                shared: Some(shared),
            },
            GroupSender(tx),
        ))
    }

    /// A handle other threads can block on until group `g` is queued (`None`: nothing loads).
    pub fn progress(&self) -> Option<LoadProgressWaiter> {
        match self.state {
            LoadState::Loading(_) => self.shared.clone().map(LoadProgressWaiter),
            _ => None,
        }
    }

    /// Makes `compute` wait (on the device) for group `g`'s copies; blocks the host only until
    /// they are queued. A no-op once the load was joined (the join made `compute` wait for
    /// everything).
    pub fn wait_group(&mut self, g: usize, compute: &Stream) -> BackendResult<()> {
        match &self.state {
            LoadState::Ready(_) => return Ok(()),
            LoadState::Failed(why) => {
                return Err(BackendError::UploadFailed {
                    reason: why.clone(),
                })
            }
            LoadState::Loading(_) | LoadState::Joining => {}
        }
        let Some(sh) = self.shared.clone() else {
            return Ok(());
        };
        if g >= sh.events.len() {
            return Err(BackendError::InvalidArgument {
                op: "LoadingRing::wait_group",
                what: format!("group {g} of {}", sh.events.len()),
            });
        }
        let queued = {
            let mut p = sh.lock();
            while p.queued <= g && !p.ended {
                p = sh.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.queued > g
        };
        if !queued {
            // The loader ended without this group: joining returns its error.
            self.ring(compute)?;
            return Err(BackendError::UploadFailed {
                reason: format!("group {g} was never queued (load cancelled)"),
            });
        }
        for e in &sh.events[g] {
            compute.wait(e)?;
        }
        if g + 1 == sh.events.len() {
            self.ring(compute)?;
        }
        Ok(())
    }

    /// The ring, joining the loader first (it has queued every group then); `compute` waits
    /// on the device for every copy the loader queued.
    pub fn ring(&mut self, compute: &Stream) -> BackendResult<&mut PinnedRing> {
        self.join(compute)?;
        match &mut self.state {
            LoadState::Ready(r) => Ok(r),
            LoadState::Failed(why) => Err(BackendError::UploadFailed {
                reason: why.clone(),
            }),
            LoadState::Loading(_) | LoadState::Joining => Err(BackendError::UploadFailed {
                reason: "the loader was not joined".into(),
            }),
        }
    }

    /// Joins the loader if it runs (see [`LoadingRing::ring`]).
    fn join(&mut self, compute: &Stream) -> BackendResult<()> {
        if !matches!(self.state, LoadState::Loading(_)) {
            return Ok(());
        }
        let LoadState::Loading(t) = std::mem::replace(&mut self.state, LoadState::Joining) else {
            return Ok(());
        };
        let joined = t.join().unwrap_or_else(|_| {
            Err(BackendError::UploadFailed {
                reason: "the loader thread panicked".into(),
            })
        });
        match joined {
            Ok(ring) => self.state = LoadState::Ready(ring),
            Err(e) => {
                self.state = LoadState::Failed(e.to_string());
                return Err(e);
            }
        }
        // Stream order: the last group's events complete after every earlier copy.
        if let Some(last) = self.shared.as_ref().and_then(|s| s.events.last()) {
            for e in last {
                compute.wait(e)?;
            }
        }
        Ok(())
    }
}

impl Drop for LoadingRing {
    fn drop(&mut self) {
        // The loader writes into device memory its owner is about to free: stop it between
        // groups and wait for it (the ring drains its copies when dropped).
        if let Some(sh) = &self.shared {
            sh.cancel.store(true, Ordering::Relaxed);
        }
        if let LoadState::Loading(t) = std::mem::replace(&mut self.state, LoadState::Joining) {
            match t.join() {
                Ok(Ok(ring)) => drop(ring),
                Ok(Err(e)) => tracing::warn!(error = %e, "background weight upload failed"),
                Err(_) => tracing::warn!("the loader thread panicked"),
            }
        }
    }
}

/// Blocks a thread until the loader has queued a group (see [`LoadingRing::progress`]).
pub struct LoadProgressWaiter(Arc<LoadShared>);

impl LoadProgressWaiter {
    /// Returns once group `g` is queued or the loader ended.
    pub fn wait_queued(&self, g: usize) {
        let mut p = self.0.lock();
        while p.queued <= g && !p.ended {
            p = self.0.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Hands groups to the loader thread in upload order (see [`LoadingRing::spawn`]).
pub struct GroupSender(mpsc::SyncSender<Vec<UploadItem>>);

impl GroupSender {
    /// Queues the next group. A loader that already ended (failed or cancelled) drops it; the
    /// waits report why.
    pub fn send(&self, items: Vec<UploadItem>) {
        let _ = self.0.try_send(items);
    }
}

/// The loader thread's work: each group through the ring as it arrives, then its events.
fn load_groups<S: AsRef<[u8]>>(
    ring: &mut PinnedRing,
    src: &S,
    rx: &mpsc::Receiver<Vec<UploadItem>>,
    sh: &LoadShared,
    t0: Instant,
) -> BackendResult<()> {
    let map = src.as_ref();
    for g in 0..sh.events.len() {
        // Polls the cancel flag while the owner is still allocating (it may fail and drop us).
        let items = loop {
            if sh.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(items) => break items,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                // The owner gave up (an allocation failed): nothing more will come.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        ring.upload_many(map, &items)?;
        ring.record_all(&sh.events[g])?;
        let at = t0.elapsed().as_secs_f64();
        if g == 0 {
            ring.stats.first_group_s = at;
        }
        ring.stats.queued_s = at;
        if g + 1 == sh.events.len() {
            // The weights-resident moment, for the load figures: the last slot's copy lands
            // ~0.3 ms after it was queued, so the compute thread joining us hardly waits.
            ring.drain()?;
            ring.stats.resident_s = t0.elapsed().as_secs_f64();
        }
        sh.lock().queued = g + 1;
        sh.changed.notify_all();
    }
    Ok(())
}

/// Starts reading `path` into the page cache on a thread of its own and returns at once.
/// Called at process start, before CUDA initialises: from a cold cache the disk then works
/// during driver init, model open and device allocations (~0.6 s) instead of idling until the
/// loader's first read. `POSIX_FADV_WILLNEED` only queues reads (no copies; cached pages are
/// skipped cheaply), but Linux caps one call at the readahead window, hence the loop over
/// `READAHEAD_CHUNK`s. Skipped when the file is larger than half the physical memory (it would
/// evict what it read before the loader got there) and when `ROCMFORGE_READAHEAD=0`.
/// Advice only: every failure is ignored.
pub fn spawn_readahead(path: &std::path::Path) {
    if std::env::var("ROCMFORGE_READAHEAD").is_ok_and(|v| v == "0") {
        return;
    }
    let Ok(f) = File::open(path) else {
        return;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let phys = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    if len == 0 || len > phys / 2 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("rf-readahead".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            let cached = resident_pages(&f, len as usize, page.max(1) as usize);
            let chunk_pages = (READAHEAD_CHUNK as usize / page.max(1) as usize).max(1);
            // SAFETY (both calls): plain syscalls on the descriptor `f` keeps open; no memory
            // is passed. SEQUENTIAL doubles this descriptor's readahead window (the cap).
            let _ = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
            let mut at = 0u64;
            let mut chunk = 0usize;
            while at < len {
                let n = READAHEAD_CHUNK.min(len - at);
                // From a warm cache every chunk is resident: no calls at all (they cost ~0.1 s
                // of page-cache walking competing with the loader's reads).
                let skip = cached.as_ref().is_some_and(|c| {
                    let p0 = chunk * chunk_pages;
                    c.get(p0..(p0 + chunk_pages).min(c.len()))
                        .is_some_and(|r| r.iter().all(|&b| b & 1 == 1))
                });
                if !skip {
                    // SAFETY: see above.
                    let r = unsafe {
                        libc::posix_fadvise(
                            fd,
                            at as libc::off_t,
                            n as libc::off_t,
                            libc::POSIX_FADV_WILLNEED,
                        )
                    };
                    if r != 0 {
                        return;
                    }
                }
                at += n;
                chunk += 1;
            }
        });
}

/// Which pages of `f` are in the page cache (`mincore` over a temporary read-only mapping;
/// `None` when that fails).
fn resident_pages(f: &File, len: usize, page: usize) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared read-only mapping of `len` bytes of an open file; nothing reads
    // through it, and it is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let mut v = vec![0u8; len.div_ceil(page)];
    // SAFETY: `p` maps `len` bytes; `v` has one byte per page of them.
    let r = unsafe { libc::mincore(p, len, v.as_mut_ptr().cast()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    (r == 0).then_some(v)
}

/// One `WILLNEED` request: the default readahead window (128 KiB) doubled by
/// `POSIX_FADV_SEQUENTIAL`, so no call is cut short by the kernel's cap.
const READAHEAD_CHUNK: u64 = 256 << 10;

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
