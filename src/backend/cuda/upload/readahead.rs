//! Page-cache readahead of the model file on a thread of its own (cold start).

use std::fs::File;

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
            // Warm cache: one `cachestat` call says every page is resident, and nothing else
            // runs (the `mincore` scan below maps the whole file and walks ~1M page-cache
            // entries for an 8B model, while the loader reads).
            if cached_pages(&f, len).is_some_and(|n| n.saturating_mul(page.max(1) as u64) >= len) {
                return;
            }
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

/// How many pages of the first `len` bytes of `f` are in the page cache, from one
/// `cachestat(2)` call (Linux 6.5+; `None` where the kernel lacks it or it fails).
fn cached_pages(f: &File, len: u64) -> Option<u64> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        use std::os::fd::AsRawFd;
        /// `struct cachestat_range` and `struct cachestat` of the kernel's uapi (mman.h).
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { off: 0, len };
        let mut st = Stat::default();
        // SAFETY: cachestat(fd, range*, cstat*, flags=0) reads `range` and writes `st`, both
        // live locals with the kernel's layout; an old kernel returns ENOSYS.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0u32,
            )
        };
        (r == 0).then_some(st.nr_cache)
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        let _ = (f, len);
        None
    }
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

/// A sequential reader of the model file into the page cache, started at process start so a
/// cold disk works while CUDA initialises (~0.3 s) instead of idling until the loader's first
/// read. Unlike `POSIX_FADV_WILLNEED` over the whole file (which queued GBs ahead of the
/// driver's own library reads and pushed cold init from 0.35 to 2.4 s), it keeps one 2 MiB read
/// in flight, so the driver's reads wait behind at most one such read. It stops when dropped
/// (the loader takes over from the start of the file, finding these pages cached).
pub struct EarlyRead {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EarlyRead {
    /// Starts it unless the file is already in the page cache (one `cachestat` call; without
    /// that syscall it starts anyway), `ROCMFORGE_EARLY_READ=0` turns it off, or the file cannot
    /// be opened. Advice only: read errors end it silently.
    pub fn start(path: &std::path::Path) -> Option<Self> {
        if std::env::var("ROCMFORGE_EARLY_READ").is_ok_and(|v| v == "0") {
            return None;
        }
        let f = File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        if cached_pages(&f, len).is_some_and(|n| n.saturating_mul(page) >= len) {
            return None;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, done) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&read));
        std::thread::Builder::new()
            .name("rf-early-read".into())
            .spawn(move || {
                use std::os::unix::fs::FileExt;
                use std::sync::atomic::Ordering;
                let mut buf = vec![0u8; 2 << 20];
                let mut at = 0u64;
                while at < len && !flag.load(Ordering::Relaxed) {
                    match f.read_at(&mut buf, at) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => at += n as u64,
                    }
                    done.store(at, Ordering::Relaxed);
                }
            })
            .ok()?;
        Some(Self { stop, read })
    }

    /// Stops it; returns the bytes it had read.
    pub fn stop(self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for EarlyRead {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
