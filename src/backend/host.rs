//! Host memory for staging rings: an anonymous mapping backed by transparent huge pages,
//! faulted in *before* the device exists (on a thread while the driver initialises) and
//! page-locked afterwards by the backend (`cuMemHostRegister` on CUDA).
//!
//! Why: `cuMemHostAlloc` pins page by page after the context exists (H100: 5.7 ms per 16 MiB),
//! while registering a pre-faulted huge-page region of 64 MiB took 1.5-1.9 ms: the page faults
//! and zeroing move off the critical path, and the driver maps 2 MiB pages. Where huge pages
//! are not available the registration still works (4 KiB pages, ~20 ms per 64 MiB).
//! Nothing here is vendor-specific.

use crate::backend::error::{BackendError, BackendResult};

const HUGE: usize = 2 << 20;

/// An anonymous read-write mapping, faulted in (every page written once), unmapped on drop.
#[derive(Debug)]
pub struct HostRegion {
    /// Start of the mapping (what `munmap` gets).
    map: *mut u8,
    map_len: usize,
    /// Start of the usable bytes (2 MiB aligned inside the mapping).
    ptr: *mut u8,
    len: usize,
    /// Whether `MADV_HUGEPAGE` was accepted (advice: the kernel may still use small pages).
    pub huge: bool,
}

// SAFETY: the region exclusively owns its mapping; it is plain host memory usable from any
// thread, and mutation goes through the ring's disjoint-range contract.
unsafe impl Send for HostRegion {}
// SAFETY: see Send; `&HostRegion` exposes only the pointer value and length.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Maps `len` bytes (rounded up to 2 MiB), asks for huge pages and writes every page once,
    /// so a later registration does no faulting. Needs no CUDA: call it while the driver
    /// initialises.
    pub fn new(len: usize) -> BackendResult<Self> {
        let len = len.max(1).div_ceil(HUGE) * HUGE;
        // One extra huge page of slack to align the start to 2 MiB (THP needs aligned 2 MiB
        // ranges).
        let map_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is referenced.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(BackendError::PinnedAlloc {
                requested: len,
                reason: format!("mmap: {}", std::io::Error::last_os_error()),
            });
        }
        let map = map.cast::<u8>();
        let skew = (HUGE - (map as usize) % HUGE) % HUGE;
        // SAFETY: `skew < HUGE`, so `ptr..ptr + len` lies inside the mapping of `len + HUGE`.
        let ptr = unsafe { map.add(skew) };
        // SAFETY: advice on a range of our own mapping; failure only means small pages.
        let huge = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) } == 0;
        let me = Self {
            map,
            map_len,
            ptr,
            len,
            huge,
        };
        // Fault every page in now (one write per 4 KiB page; a huge page takes the first).
        for off in (0..len).step_by(4096) {
            // SAFETY: `off < len`: inside the usable range, which nothing else references yet.
            unsafe { me.ptr.add(off).write_volatile(0) };
        }
        Ok(me)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the usable bytes (2 MiB aligned), for a backend's registration.
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; a registered owner unregistered it
        // first (see `RegisteredHost`'s drop order).
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}
