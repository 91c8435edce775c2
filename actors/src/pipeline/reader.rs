//! DiskReader: owns the model file and serves units (layers) in the order the Scheduler asks.
//!
//! Several reader threads share one job queue, so consecutive layers are read in parallel (one
//! thread reads page cache at ~9 GB/s; a cold disk wants several requests in flight).
//! - `mmap` mode: `madvise(WILLNEED)` on the unit's range, then touch one byte per page so the
//!   pages are really in memory before compute needs them; chunks are views of the map.
//! - `read` / `direct` mode: `pread` straight into staging slots of the read ring (`O_DIRECT`
//!   through an aligned bounce buffer where the filesystem allows it).
//!
//! Before each unit the reader checks that the file is still the one loaded (`SourceFile`: one
//! `fstat`), so a file truncated or overwritten in place is a load error naming it, not bytes of
//! another model. Every job carries its load attempt: once that attempt is no longer the live one
//! (it failed elsewhere, or a reload abandoned it) the reader stops reading it.

use crate::error::{Result, RuntimeError};
use crate::messages::{ReadMode, Stage};
use crate::pipeline::backend::WeightBackend;
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::{LoadFailure, ResidencyBoard};
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::{recv_or_cancel, spawn_actor, Shared};
use crate::pipeline::source::{ModelSource, SourceFile};
use crate::pipeline::staging::{StagingRing, StagingSlot};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PAGE: usize = 4096;

/// "Load this unit" (Scheduler -> DiskReader). A large unit is split into `n_parts` jobs that
/// several readers serve in parallel: part `p` reads the unit's chunks `p, p + n, p + 2n, ...`
/// (striped, so the readers stay close together in the file).
#[derive(Debug, Clone, Copy)]
pub struct ReadJob {
    pub unit: usize,
    pub part: usize,
    pub n_parts: usize,
    /// The load attempt (`ResidencyBoard::begin_load`) this job belongs to.
    pub attempt: u64,
}

pub enum ChunkData {
    /// Bytes read into a staging slot.
    Slot(StagingSlot),
    /// A range of the file map (`mmap` mode).
    Mapped(Range<usize>),
}

/// A piece of one tensor (DiskReader -> TranscodePool -> Uploader).
pub struct Chunk {
    pub unit: usize,
    /// The load attempt it was read for.
    pub attempt: u64,
    /// Position of the tensor within its unit.
    pub tensor: usize,
    /// Offset of this chunk within the tensor, in file bytes.
    pub offset: u64,
    pub len: usize,
    pub data: ChunkData,
}

pub struct ReaderConfig {
    pub source: Arc<ModelSource>,
    pub board: Arc<ResidencyBoard>,
    pub map: Arc<Mmap>,
    pub mode: ReadMode,
    pub n_readers: usize,
    pub plan: Arc<LoadPlan>,
    pub backend: Arc<dyn WeightBackend>,
    pub ring: StagingRing,
    pub jobs: flume::Receiver<ReadJob>,
    pub out: flume::Sender<Chunk>,
    pub sched: flume::Sender<SchedMsg>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub delay_per_chunk: Duration,
}

/// Tells the kernel a mapped range is not needed any more. Only whole pages inside `span` are
/// dropped, so neighbouring units sharing a boundary page keep theirs.
pub fn advise_dontneed(map: &Mmap, span: Range<usize>) {
    let start = span.start.div_ceil(PAGE) * PAGE;
    let end = span.end.min(map.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: the map is a read-only private file mapping and no `&mut` to it exists;
        // MADV_DONTNEED only drops page-table entries, and later reads fault the same bytes back
        // in from the file, so every outstanding `&[u8]` into the map stays valid.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// The file ranges of a unit's tensors, adjacent ones merged (gaps up to a page are bridged).
fn tensor_runs(unit: &crate::pipeline::plan::Unit) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = unit.tensors.iter().map(|t| t.file.clone()).collect();
    r.sort_by_key(|x| x.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(r.len());
    for x in r.into_iter().filter(|x| x.end > x.start) {
        match out.last_mut() {
            Some(last) if x.start <= last.end + PAGE as u64 => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// Asks the kernel to start reading `len` bytes at `offset` of `file` into the page cache.
pub fn advise_willneed(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: an advisory syscall on a descriptor `file` owns; it reads no user memory, and a
    // failure only means no readahead.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
}

/// Bytes of a model file [`early_readahead`] hands to the kernel: about what a disk at ~2 GB/s
/// reads while a GPU driver initialises (~0.2-0.3 s), with room to spare.
pub const EARLY_READAHEAD_BYTES: u64 = 1 << 30;

/// A cold start's disk works while the rest of the start-up does (the GPU driver's ~0.2 s
/// initialisation, before the readers can start): the first `len` bytes of `path` go to the
/// kernel's readahead at once (`posix_fadvise(WILLNEED)`: asynchronous, into the page cache the
/// buffered and mapped readers then find them in), unless most of them are cached already
/// (`mincore`; a warm start then costs one page-table walk). Returns whether it advised;
/// errors only mean no readahead.
pub fn early_readahead(path: &std::path::Path, len: u64) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let len = file.metadata().map_or(0, |m| m.len()).min(len);
    if len == 0 || cached_fraction(&file, len).is_ok_and(|f| f >= 0.9) {
        return false;
    }
    advise_willneed(&file, 0, len);
    true
}

/// Fraction of the pages of `file`'s first `len` bytes that sit in the page cache (`mincore`
/// over a read-only map that is never read); 0 for an empty range.
pub fn cached_fraction(file: &File, len: u64) -> std::io::Result<f64> {
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: a read-only private map of the file, only passed to `mincore`, never read.
    let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }?;
    let pages = (len as usize).div_ceil(PAGE);
    let mut resident = vec![0u8; pages];
    // SAFETY: `map` is a live page-aligned mapping of `len` bytes and `resident` has one byte
    // per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            len as usize,
            resident.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(resident.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64)
}

/// Splits a tensor into chunk lengths (in file bytes) that fit one staging slot after
/// transcoding and never cut a quant block.
pub fn chunk_len(
    backend: &dyn WeightBackend,
    ty: rocmforge::quant::qtype::GgmlType,
    slot: usize,
) -> usize {
    let bb = ty.block_bytes().max(1) as usize;
    let db = backend.transcoded_bytes(ty, ty.block_bytes()).max(1) as usize;
    (slot / bb.max(db)).max(1) * bb
}

struct Reader {
    idx: usize,
    cfg: Arc<ReaderConfig>,
    /// The model, checked against the accepted identity before each unit (every mode).
    file: SourceFile,
    direct: Option<DirectIo>,
    /// The source generation `direct` was last opened (or refused) for.
    direct_generation: Option<u64>,
}

/// Starts the reader threads; returns once each has opened its file (readiness).
pub fn spawn(cfg: ReaderConfig) -> Result<Vec<JoinHandle<()>>> {
    let cfg = Arc::new(cfg);
    let mut handles = Vec::new();
    for idx in 0..cfg.n_readers.max(1) {
        let cfg2 = cfg.clone();
        handles.push(spawn_actor(
            "reader",
            format!("rf-reader-{idx}"),
            move |ready| match Reader::open(idx, cfg2) {
                Ok(mut r) => {
                    ready.ready();
                    r.run();
                }
                Err(e) => ready.fail(e),
            },
        )?);
    }
    Ok(handles)
}

impl Reader {
    fn open(idx: usize, cfg: Arc<ReaderConfig>) -> Result<Self> {
        let mut file = SourceFile::new(cfg.source.clone());
        file.get()?;
        let mut r = Self {
            idx,
            cfg,
            file,
            direct: None,
            direct_generation: None,
        };
        r.open_direct();
        Ok(r)
    }

    /// (Re)opens the `O_DIRECT` descriptor for the source's current generation (`direct`
    /// mode; a filesystem that refuses `O_DIRECT` (tmpfs, overlayfs...) gets buffered reads).
    fn open_direct(&mut self) {
        let cfg = &self.cfg;
        let generation = cfg.source.generation();
        if cfg.mode != ReadMode::Direct || self.direct_generation == Some(generation) {
            return;
        }
        self.direct_generation = Some(generation);
        self.direct = DirectIo::open(cfg.source.path(), cfg.ring.slot_size()).ok();
        cfg.shared
            .counters
            .direct_io
            .store(self.direct.is_some(), Ordering::Release);
    }

    fn run(&mut self) {
        let cfg = self.cfg.clone();
        loop {
            let job = recv_or_cancel(&cfg.jobs, &cfg.cancel);
            let Some(job) = job else { return };
            if let Err(e) = self.read_unit(job) {
                if matches!(e, RuntimeError::Cancelled) {
                    return;
                }
                let _ = cfg.sched.send(SchedMsg::LoadFailed {
                    unit: job.unit,
                    attempt: job.attempt,
                    failure: LoadFailure::new(cfg.plan.unit_name(job.unit), cfg.source.path(), &e),
                });
            }
        }
    }

    fn read_unit(&mut self, job: ReadJob) -> Result<()> {
        let unit_idx = job.unit;
        let n_parts = job.n_parts.max(1) as u64;
        let mut chunk_no = 0u64;
        let cfg = self.cfg.clone();
        let unit = &cfg.plan.units[unit_idx];
        let layer = unit.layer.map(|l| l as i64).unwrap_or(-1);
        let span = tracing::info_span!("read", layer, bytes = unit.file_bytes, stream = self.idx);
        let _g = span.enter();
        if !cfg.board.is_live(unit_idx, job.attempt) {
            return Ok(());
        }
        // The file must still be the one loaded (after a reload: the one accepted then).
        let f = self.file.get()?;
        // Advice per run of adjacent tensors, not over the unit's span: the global unit's tensors
        // sit at both ends of the file, and its span is the whole model.
        for r in tensor_runs(unit).into_iter().filter(|_| job.part == 0) {
            match cfg.mode {
                ReadMode::Mmap => {
                    let _ = cfg.map.advise_range(
                        Advice::WillNeed,
                        r.start as usize,
                        (r.end - r.start) as usize,
                    );
                }
                // The whole unit goes to the disk queue at once (asynchronous readahead), so a
                // cold read keeps the device busy instead of one chunk-sized request per reader.
                ReadMode::Read => advise_willneed(f, r.start, r.end - r.start),
                ReadMode::Direct => {}
            }
        }
        self.open_direct();
        for (ti, t) in unit.tensors.iter().enumerate() {
            let step = chunk_len(&*cfg.backend, t.ty, cfg.ring.slot_size());
            let total = t.file.end - t.file.start;
            let mut off = 0u64;
            while off < total {
                if cfg.cancel.is_cancelled() {
                    return Err(RuntimeError::Cancelled);
                }
                let len = (total - off).min(step as u64) as usize;
                chunk_no += 1;
                if (chunk_no - 1) % n_parts != job.part as u64 {
                    off += len as u64;
                    continue;
                }
                // Another part failed, or a reload abandoned this load: stop reading it.
                if !cfg.board.is_live(unit_idx, job.attempt) {
                    return Ok(());
                }
                let start = Instant::now();
                let abs = t.file.start + off;
                let data = {
                    let _s = tracing::info_span!(
                        "read_chunk",
                        layer,
                        tensor = t.name.as_str(),
                        bytes = len,
                        stream = self.idx
                    )
                    .entered();
                    if !cfg.delay_per_chunk.is_zero() {
                        std::thread::sleep(cfg.delay_per_chunk);
                    }
                    self.read_chunk(abs, len)?
                };
                cfg.shared.add_busy(Stage::Read, start);
                cfg.shared
                    .counters
                    .read_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                let chunk = Chunk {
                    unit: unit_idx,
                    attempt: job.attempt,
                    tensor: ti,
                    offset: off,
                    len,
                    data,
                };
                // A blocking send: backpressure from the TranscodePool is the point.
                if cfg.out.send(chunk).is_err() {
                    return Err(RuntimeError::Cancelled);
                }
                off += len as u64;
            }
        }
        Ok(())
    }

    fn read_chunk(&mut self, abs: u64, len: usize) -> Result<ChunkData> {
        let cfg = &self.cfg;
        if cfg.mode == ReadMode::Mmap {
            let r = abs as usize..abs as usize + len;
            let bytes = cfg.map.get(r.clone()).ok_or_else(|| RuntimeError::Read {
                path: cfg.source.path().to_path_buf(),
                offset: abs,
                len,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
            // Touch every page so it is faulted in here, on the reader thread, not during compute.
            let mut acc = 0u8;
            for p in bytes.iter().step_by(PAGE) {
                acc ^= *p;
            }
            std::hint::black_box(acc);
            return Ok(ChunkData::Mapped(r));
        }
        let mut slot = cfg
            .ring
            .acquire(&cfg.cancel)
            .ok_or(RuntimeError::Cancelled)?;
        let read_err = |source| RuntimeError::Read {
            path: cfg.source.path().to_path_buf(),
            offset: abs,
            len,
            source,
        };
        let dst = &mut slot.buffer_mut()[..len];
        let mut done = false;
        if let Some(d) = &mut self.direct {
            match d.read_at(abs, dst) {
                Ok(()) => done = true,
                // EINVAL mid-way (an unaligned tail on some filesystems): fall back for good.
                Err(_) => {
                    self.direct = None;
                    cfg.shared
                        .counters
                        .direct_io
                        .store(false, Ordering::Release);
                }
            }
        }
        if !done {
            let f = self
                .file
                .opened()
                .ok_or_else(|| read_err(std::io::ErrorKind::NotFound.into()))?;
            f.read_exact_at(dst, abs).map_err(read_err)?;
        }
        slot.len = len;
        Ok(ChunkData::Slot(slot))
    }
}

/// Reads `bytes` of `path` from `offset` the way `mode` does, in 4 MiB pieces one after
/// another, as the page cache stands (`direct` bypasses it where the filesystem allows; `mmap`
/// and `read` go through it), and returns the bytes read: the caller times it (the streaming
/// side of `--explain`'s expected decode rate).
pub fn read_span(
    path: &std::path::Path,
    mode: ReadMode,
    offset: u64,
    bytes: usize,
) -> std::io::Result<usize> {
    const PIECE: usize = 4 << 20;
    let mut done = 0usize;
    let direct = match mode {
        ReadMode::Direct => DirectIo::open(path, PIECE).ok(),
        _ => None,
    };
    let mut buf = vec![0u8; PIECE];
    match direct {
        Some(mut d) => {
            while done < bytes {
                let n = PIECE.min(bytes - done);
                d.read_at(offset + done as u64, &mut buf[..n])?;
                done += n;
            }
        }
        None => {
            let f = File::open(path)?;
            while done < bytes {
                let n = PIECE.min(bytes - done);
                let got = f.read_at(&mut buf[..n], offset + done as u64)?;
                if got == 0 {
                    break;
                }
                done += got;
            }
        }
    }
    Ok(done)
}

/// `O_DIRECT` reads need the buffer, the offset and the length aligned to the logical block
/// size; reads go through an aligned bounce buffer and the wanted part is copied out.
struct DirectIo {
    file: File,
    bounce: AlignedBuf,
}

const DIRECT_ALIGN: usize = 4096;

impl DirectIo {
    fn open(path: &std::path::Path, slot_size: usize) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let bounce = AlignedBuf::new(slot_size + 2 * DIRECT_ALIGN)
            .ok_or_else(|| std::io::Error::other("aligned allocation failed"))?;
        let mut d = Self { file, bounce };
        // Probe: some filesystems accept the flag at open and refuse at read.
        let mut probe = [0u8; 1];
        d.read_at(0, &mut probe)?;
        Ok(d)
    }

    fn read_at(&mut self, abs: u64, dst: &mut [u8]) -> std::io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = abs / a * a;
        let end = (abs + dst.len() as u64).div_ceil(a) * a;
        let want = (end - start) as usize;
        let buf = self.bounce.as_mut_slice();
        if want > buf.len() {
            return Err(std::io::Error::other("chunk larger than the bounce buffer"));
        }
        let mut got = 0usize;
        while got < want {
            let n = self.file.read_at(&mut buf[got..want], start + got as u64)?;
            if n == 0 {
                break; // end of file: the tail past EOF is not needed
            }
            got += n;
        }
        let skip = (abs - start) as usize;
        if got < skip + dst.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        dst.copy_from_slice(&buf[skip..skip + dst.len()]);
        Ok(())
    }
}

struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(Self {
            ptr: std::ptr::NonNull::new(ptr)?,
            layout,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by `self`,
        // and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod early_readahead_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn advises_only_files_mostly_out_of_the_page_cache() {
        assert!(!early_readahead(
            std::path::Path::new("/nonexistent/model.gguf"),
            1 << 20
        ));
        let dir = std::env::temp_dir().join(format!("rf-early-ra-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.bin");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 3 << 20]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert!(!early_readahead(&path, 0), "nothing to read");
        // Just written: its pages are in the page cache, so nothing is advised.
        assert!(!early_readahead(&path, 1 << 30));
        // Evicted (where the filesystem lets clean pages go): advised, and whether it was
        // follows what mincore says of the file.
        crate::cli::ttft::evict_from_page_cache(&path).unwrap();
        let cached = crate::cli::ttft::page_cache_fraction(&path).unwrap();
        assert_eq!(
            early_readahead(&path, 1 << 30),
            cached < 0.9,
            "cached {cached}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
