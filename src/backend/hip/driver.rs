//! [`HipDriver`]: the HIP runtime calls behind the vendor-neutral memory, stream and event types
//! (`backend::driver`). HIP has no context objects: every call first makes the device current
//! on the calling thread (`hipSetDevice`, a thread-local store).

use std::ffi::{c_int, c_void};

use hip_runtime_sys as sys;

use super::device::{bind, check, err_text};
use crate::backend::driver::{self, Driver, HostAllocError};
use crate::backend::error::BackendResult;

/// One HIP device, by ordinal.
#[derive(Debug)]
pub struct HipDriver {
    pub(crate) ordinal: c_int,
}

pub type DeviceBuf = driver::DeviceBuf<HipDriver>;
pub type PinnedBuf = driver::PinnedBuf<HipDriver>;
pub type Stream = driver::Stream<HipDriver>;
pub type Event = driver::Event<HipDriver>;

/// A device address as the pointer type the bindings take.
fn dev(p: u64) -> *mut c_void {
    p as *mut c_void
}

// SAFETY: every method is the documented runtime call for its role, made with the device
// current; handles come from the matching create calls.
unsafe impl Driver for HipDriver {
    const VENDOR: &'static str = "HIP";
    type RawStream = sys::hipStream_t;
    type RawEvent = sys::hipEvent_t;

    fn mem_info(&self) -> BackendResult<(usize, usize)> {
        bind(self.ordinal)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: two valid out-pointers; the device is current.
        check("hipMemGetInfo", unsafe {
            sys::hipMemGetInfo(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    fn malloc(&self, bytes: usize) -> BackendResult<Option<u64>> {
        bind(self.ordinal)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the memory is only handed out as raw device bytes.
        match unsafe { sys::hipMalloc(&mut p, bytes) } {
            sys::hipError_t::hipSuccess => Ok(Some(p as u64)),
            sys::hipError_t::hipErrorOutOfMemory => Ok(None),
            e => check("hipMalloc", e).map(|_| None),
        }
    }

    unsafe fn free(&self, ptr: u64) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract (from hipMalloc, freed once).
        check("hipFree", unsafe { sys::hipFree(dev(ptr)) })
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the destination range is live (caller); `src` is valid for reads (the binding
        // takes `*mut` but hipMemcpyHtoD only reads the source).
        check("hipMemcpyHtoD", unsafe {
            sys::hipMemcpyHtoD(dev(dst), src.as_ptr() as *mut c_void, src.len())
        })
    }

    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the source range is live (caller); `dst` is valid for writes.
        check("hipMemcpyDtoH", unsafe {
            sys::hipMemcpyDtoH(dst.as_mut_ptr().cast(), dev(src), dst.len())
        })
    }

    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the range is live (caller).
        check("hipMemsetD8", unsafe {
            sys::hipMemsetD8(dev(dst), 0, bytes)
        })
    }

    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, HostAllocError> {
        bind(self.ordinal).map_err(|e| e.to_string())?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; hipHostMallocDefault = plain pinned memory.
        let e = unsafe { sys::hipHostMalloc(&mut p, bytes, sys::hipHostMallocDefault) };
        if e != sys::hipError_t::hipSuccess || p.is_null() {
            return Err(err_text(e));
        }
        Ok(p.cast())
    }

    unsafe fn host_free(&self, ptr: *mut u8) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract (from hipHostMalloc, freed once).
        check("hipHostFree", unsafe { sys::hipHostFree(ptr.cast()) })
    }

    fn stream_create(&self) -> BackendResult<sys::hipStream_t> {
        bind(self.ordinal)?;
        let mut raw: sys::hipStream_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the device is current.
        check("hipStreamCreateWithFlags", unsafe {
            sys::hipStreamCreateWithFlags(&mut raw, sys::hipStreamNonBlocking)
        })?;
        Ok(raw)
    }

    unsafe fn stream_destroy(&self, s: sys::hipStream_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipStreamDestroy", unsafe { sys::hipStreamDestroy(s) })
    }

    unsafe fn stream_synchronize(&self, s: sys::hipStream_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipStreamSynchronize", unsafe {
            sys::hipStreamSynchronize(s)
        })
    }

    unsafe fn stream_wait(&self, s: sys::hipStream_t, e: sys::hipEvent_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipStreamWaitEvent", unsafe {
            sys::hipStreamWaitEvent(s, e, 0)
        })
    }

    unsafe fn copy_htod_async(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
        s: sys::hipStream_t,
    ) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract (live ranges until the copy completed).
        check("hipMemcpyHtoDAsync", unsafe {
            sys::hipMemcpyHtoDAsync(dev(dst), src as *mut c_void, len, s)
        })
    }

    fn event_create(&self, timing: bool) -> BackendResult<sys::hipEvent_t> {
        bind(self.ordinal)?;
        let flags = if timing {
            sys::hipEventDefault
        } else {
            sys::hipEventDisableTiming
        };
        let mut raw: sys::hipEvent_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the device is current.
        check("hipEventCreateWithFlags", unsafe {
            sys::hipEventCreateWithFlags(&mut raw, flags)
        })?;
        Ok(raw)
    }

    unsafe fn event_destroy(&self, e: sys::hipEvent_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipEventDestroy", unsafe { sys::hipEventDestroy(e) })
    }

    unsafe fn event_record(&self, e: sys::hipEvent_t, s: sys::hipStream_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipEventRecord", unsafe { sys::hipEventRecord(e, s) })
    }

    unsafe fn event_synchronize(&self, e: sys::hipEvent_t) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        check("hipEventSynchronize", unsafe {
            sys::hipEventSynchronize(e)
        })
    }

    unsafe fn event_query(&self, e: sys::hipEvent_t) -> BackendResult<bool> {
        bind(self.ordinal)?;
        // SAFETY: the caller's contract.
        match unsafe { sys::hipEventQuery(e) } {
            sys::hipError_t::hipSuccess => Ok(true),
            sys::hipError_t::hipErrorNotReady => Ok(false),
            e => check("hipEventQuery", e).map(|_| false),
        }
    }

    unsafe fn event_elapsed_ms(
        &self,
        start: sys::hipEvent_t,
        end: sys::hipEvent_t,
    ) -> BackendResult<f32> {
        bind(self.ordinal)?;
        let mut ms = 0f32;
        // SAFETY: the caller's contract; valid out-pointer.
        check("hipEventElapsedTime", unsafe {
            sys::hipEventElapsedTime(&mut ms, start, end)
        })?;
        Ok(ms)
    }
}
