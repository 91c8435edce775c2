//! The pinned upload ring: one page-locked host buffer cut into slots, several copy streams and
//! one event per slot. Fill threads read the model file with positional reads (`pread`) straight
//! into the slots (page cache or disk; no page faults of the mapping), falling back to copies
//! from the mapping when the file cannot be opened. Several uploads are packed into one slot;
//! each gets its own async copy on a copy stream and the slot's event is recorded after them; a
//! slot is refilled only after that event completed. Layers become ready on the device through
//! events the compute stream waits on (`cuStreamWaitEvent`): the host never waits for an upload
//! except to reuse a slot.
//!
//! The fill is a pipeline (`fill.rs`): the fill threads work through page-aligned tasks of many
//! slots ahead while the calling thread queues each slot's copies as soon as its last task is
//! done, so no thread waits at a per-slot barrier.
//!
//! - `../host.rs`   — [`HostRegion`]/[`RegisteredHost`]: huge-page host memory faulted in before
//!   CUDA init and registered after it (the ring's memory).
//! - `fill.rs`      — the fill pipeline behind [`PinnedRing::upload_groups`].
//! - `loading.rs`   — [`LoadingRing`]: the ring on a loader thread, one event per upload group.
//! - `readahead.rs` — [`spawn_readahead`]: page-cache readahead of the model file (cold start).

use super::memory::PinnedBuf;
use super::stream::{Event, Stream};
use super::CudaDevice;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{ComputeDevice, DeviceBuffer, DeviceEvent, DeviceStream};
use std::fs::File;
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod fill;

mod loading;
mod readahead;

pub use super::host::{HostRegion, RegisteredHost};
pub use loading::{LoadProgressWaiter, LoadingRing};
pub use readahead::{spawn_readahead, EarlyRead};

/// A process-wide time origin for start-up timelines across threads (the first call fixes it;
/// the CLI calls it first thing).
pub fn epoch() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`].
pub fn since_epoch_ms() -> f64 {
    epoch().elapsed().as_secs_f64() * 1e3
}

/// Ring geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    pub slots: usize,
    pub slot_bytes: usize,
    pub copy_streams: usize,
    /// Host threads filling slots (one thread reads ~3-5 GB/s from the page cache into pinned
    /// memory; H100 host, reads alone: 8 threads 47 GB/s, 12 threads 65 GB/s, 16 threads
    /// 63 GB/s; with the copies, 12 and 16 threads alike).
    pub fill_threads: usize,
    /// Size of one fill task (a `pread` of at most this many bytes, page aligned).
    pub task_bytes: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        // 8 x 8 MiB (H100, `...-v4-call2.txt`, weights resident from a warm cache): 8 x 8 MiB
        // and 4 x 16 MiB 46-48 GB/s, 8 x 16 MiB 41-45, 16 x 16 MiB and 8 x 32 MiB 33-34: a
        // small ring stays in the host's last-level cache between the fill threads' writes and
        // the copy engine's reads. The copies then run near PCIe speed (the loader waits on
        // slots, not on reads). Eight slots let the fill threads work up to 7 slots ahead of
        // the copy being queued. 2 MiB tasks: 4 per slot.
        let cfg = Self {
            slots: 8,
            slot_bytes: 8 << 20,
            copy_streams: 2,
            fill_threads: 12,
            task_bytes: 2 << 20,
        };
        cfg.with_env_overrides()
    }
}

impl RingConfig {
    /// `ROCMFORGE_UPLOAD_THREADS`, `ROCMFORGE_UPLOAD_SLOTS`, `ROCMFORGE_UPLOAD_SLOT_MIB` and
    /// `ROCMFORGE_UPLOAD_TASK_KIB` override the geometry (tuning on a new machine without a
    /// rebuild; unparsable values are ignored).
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
        if let Some(n) = var("ROCMFORGE_UPLOAD_TASK_KIB").filter(|&n| n >= 4) {
            self.task_bytes = n << 10;
        }
        self
    }

    /// The same geometry with no more slots than a file of `len` bytes fills (at least two):
    /// a small model does not pin (or fault in) memory it never uses.
    pub fn for_file(mut self, len: u64) -> Self {
        let slot = self.slot_bytes.max(1) as u64;
        let need = usize::try_from(len.div_ceil(slot)).unwrap_or(usize::MAX);
        self.slots = self.slots.min(need).max(2);
        self
    }

    /// Host bytes the ring pins.
    pub fn ring_bytes(&self) -> usize {
        self.slots.max(2) * self.slot_bytes.max(1 << 20)
    }
}

/// Where upload time went (host side).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct UploadStats {
    pub bytes: u64,
    /// Wall time the fill threads spent reading: from the first task's start to the last one's
    /// end, summed over uploads (`pread`, or copies from the mapping).
    pub fill_s: f64,
    /// Thread-seconds inside the reads (over all fill threads).
    pub read_busy_s: f64,
    /// Queueing thread: time waiting for a slot's previous copy to complete.
    pub wait_s: f64,
    /// Queueing thread: time waiting for the fill threads to finish a slot.
    pub stall_s: f64,
    /// Queueing thread: time queueing copies and events.
    pub queue_s: f64,
    /// The longest single slot's queueing (copies + event) and when it started (ms since
    /// [`epoch`]): a driver call blocked by another thread shows here.
    pub queue_max_ms: f64,
    pub queue_max_at_ms: f64,
    /// Time building the ring (registering or allocating pinned memory, streams, events,
    /// threads).
    pub ring_alloc_s: f64,
    /// How the ring's host memory was pinned.
    pub host: &'static str,
    /// Whether slots were filled with `pread` (true) or from the mapping (false).
    pub pread: bool,
    /// Background load ([`LoadingRing`]): when the loader started (ms since [`epoch`]).
    pub start_at_ms: f64,
    /// Background load: seconds from the start of the load until the first group (the
    /// embedding table) and the last group had their copies queued.
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

/// The ring's page-locked host memory.
enum HostMem {
    /// Huge-page region registered with `cuMemHostRegister` (the fast path).
    Registered(RegisteredHost),
    /// `cuMemHostAlloc` (when registration is refused).
    Alloc(PinnedBuf),
}

impl HostMem {
    fn len(&self) -> usize {
        match self {
            Self::Registered(r) => r.len(),
            Self::Alloc(b) => b.len(),
        }
    }
}

struct Slot {
    done: Event,
    in_flight: bool,
}

pub struct PinnedRing {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    // Declared before `host`: dropped (and drained, see Drop) before the memory is unpinned.
    slots: Vec<Slot>,
    streams: Vec<Stream>,
    host: HostMem,
    /// `host`'s first byte, as an integer (it crosses to the fill threads; see `fill.rs`).
    base: usize,
    slot_bytes: usize,
    task_bytes: usize,
    /// Slot index of the next fill.
    next: usize,
    pool: rayon::ThreadPool,
    file: Option<File>,
    pub stats: UploadStats,
}

/// Fill tasks are split at this granularity (page size: `pread` into pinned memory wants no
/// partial pages per thread, and the page cache works in pages).
const TASK_ALIGN: usize = 4096;

impl PinnedRing {
    /// A ring over freshly mapped memory (see [`PinnedRing::with_region`]).
    pub fn new(dev: &CudaDevice, cfg: RingConfig) -> BackendResult<Self> {
        Self::with_region(dev, cfg, None)
    }

    /// A ring over `region` (faulted in beforehand, e.g. while CUDA initialised), registered
    /// now; a missing or too small region is mapped here. If the driver refuses the
    /// registration, the slots come from `cuMemHostAlloc` instead.
    pub fn with_region(
        dev: &CudaDevice,
        cfg: RingConfig,
        region: Option<HostRegion>,
    ) -> BackendResult<Self> {
        let t = Instant::now();
        let slot_bytes = cfg.slot_bytes.max(1 << 20);
        let total = cfg.ring_bytes();
        let region = match region {
            Some(r) if r.len() >= total => r,
            _ => HostRegion::new(total)?,
        };
        let huge = region.huge;
        let (host, base) = match RegisteredHost::register(&dev.ctx, region) {
            Ok(r) => {
                let base = r.ptr() as usize;
                (HostMem::Registered(r), base)
            }
            Err(e) => {
                tracing::debug!(error = %e, "host registration refused; cuMemHostAlloc instead");
                let mut b = dev.alloc_pinned_unzeroed(total)?;
                let base = b.host_ptr_mut() as usize;
                (HostMem::Alloc(b), base)
            }
        };
        let host_kind = match (&host, huge) {
            (HostMem::Registered(_), true) => "registered, huge pages",
            (HostMem::Registered(_), false) => "registered",
            (HostMem::Alloc(_), _) => "cuMemHostAlloc",
        };
        let slots = (0..host.len() / slot_bytes)
            .map(|_| {
                Ok(Slot {
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
            ctx: std::sync::Arc::clone(&dev.ctx),
            slots,
            streams,
            host,
            base,
            slot_bytes,
            task_bytes: cfg.task_bytes.max(TASK_ALIGN) / TASK_ALIGN * TASK_ALIGN,
            next: 0,
            pool,
            file: None,
            stats: UploadStats {
                ring_alloc_s: t.elapsed().as_secs_f64(),
                host: host_kind,
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
        self.slot_bytes
    }

    /// Pinned bytes held by the ring.
    pub fn pinned_bytes(&self) -> usize {
        self.host.len()
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
        self.upload_groups(map, &[items], None, |_, _| Ok(()))
            .map(|_| ())
    }

    /// Queues every group's items in order through the fill pipeline and calls
    /// `on_group(g, copy_streams)` as soon as group `g`'s last copy is queued (to record events
    /// on the copy streams). Stops between slots once `cancel` is set and returns `Ok(false)`.
    /// Liveness of every `dst` as in [`PinnedRing::upload_many`].
    pub fn upload_groups<G: AsRef<[UploadItem]>>(
        &mut self,
        map: &[u8],
        groups: &[G],
        cancel: Option<&std::sync::atomic::AtomicBool>,
        on_group: impl FnMut(usize, &[Stream]) -> BackendResult<()>,
    ) -> BackendResult<bool> {
        fill::run(self, map, groups, cancel, on_group)
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
