//! [`HipDriver`]: the HIP runtime calls behind the vendor-neutral memory, stream, event, module
//! and launch types (`backend::driver`, `backend::module`). HIP has no context objects: every
//! call first makes the device current on the calling thread (`hipSetDevice`, a thread-local
//! store).
//!
//! Launch arguments go through `hipModuleLaunchKernel`'s `extra` buffer (one packed, naturally
//! aligned struct of all parameters, [`pack_args`]), the form the HIP documentation gives for
//! module launches and the one every ROCm release accepts; `kernelParams` was unimplemented in
//! older releases.

use std::ffi::{c_int, c_void, CStr};

use hip_runtime_sys as sys;

use super::device::{bind, check, err_text};
use crate::backend::driver::{self, Driver, HostAllocError};
use crate::backend::error::BackendResult;
use crate::backend::gpu::{Arg, LaunchShape};
use crate::backend::module;

/// One HIP device, by ordinal.
#[derive(Debug)]
pub struct HipDriver {
    pub(crate) ordinal: c_int,
}

pub type DeviceBuf = driver::DeviceBuf<HipDriver>;
pub type PinnedBuf = driver::PinnedBuf<HipDriver>;
pub type Stream = driver::Stream<HipDriver>;
pub type Event = driver::Event<HipDriver>;
pub type Module = module::Module<HipDriver>;
pub type Kernel = module::Kernel<HipDriver>;

// HIP_LAUNCH_PARAM_* from hip_runtime_api.h (macros, so absent from the bindings).
const LAUNCH_PARAM_BUFFER_POINTER: usize = 0x01;
const LAUNCH_PARAM_BUFFER_SIZE: usize = 0x02;
const LAUNCH_PARAM_END: usize = 0x03;

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
    type RawModule = sys::hipModule_t;
    type RawFunction = sys::hipFunction_t;

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

    fn make_current(&self) -> BackendResult<()> {
        bind(self.ordinal)
    }

    unsafe fn module_load(&self, image: &[u8]) -> Result<sys::hipModule_t, String> {
        let mut raw: sys::hipModule_t = std::ptr::null_mut();
        // SAFETY: the caller's contract: the device is current and `image` a complete code
        // object, alive for the call (the runtime copies what it needs); valid out-pointer.
        let e = unsafe { sys::hipModuleLoadData(&mut raw, image.as_ptr().cast()) };
        if e != sys::hipError_t::hipSuccess {
            return Err(err_text(e));
        }
        Ok(raw)
    }

    unsafe fn module_unload(&self, m: sys::hipModule_t) -> Result<(), String> {
        // SAFETY: the caller's contract (loaded, unloaded once, nothing launched after).
        let e = unsafe { sys::hipModuleUnload(m) };
        if e != sys::hipError_t::hipSuccess {
            return Err(err_text(e));
        }
        Ok(())
    }

    unsafe fn module_function(
        &self,
        m: sys::hipModule_t,
        name: &CStr,
    ) -> Option<sys::hipFunction_t> {
        let mut raw: sys::hipFunction_t = std::ptr::null_mut();
        // SAFETY: the caller's contract (device current, module loaded); `name` is
        // NUL-terminated; valid out-pointer.
        let e = unsafe { sys::hipModuleGetFunction(&mut raw, m, name.as_ptr()) };
        if e != sys::hipError_t::hipSuccess || raw.is_null() {
            return None;
        }
        Some(raw)
    }

    unsafe fn launch(
        &self,
        f: sys::hipFunction_t,
        shape: LaunchShape,
        s: sys::hipStream_t,
        args: &[Arg],
    ) -> Result<(), String> {
        let (mut buf, mut len) = pack_args(args);
        let mut extra: [*mut c_void; 5] = [
            LAUNCH_PARAM_BUFFER_POINTER as *mut c_void,
            buf.as_mut_ptr().cast(),
            LAUNCH_PARAM_BUFFER_SIZE as *mut c_void,
            (&mut len as *mut usize).cast(),
            LAUNCH_PARAM_END as *mut c_void,
        ];
        // SAFETY: `f`'s module is loaded and `s` live (caller); `extra` points at `buf` and
        // `len`, alive for the call (the runtime copies the arguments at launch); the argument
        // contract is the caller's.
        let e = unsafe {
            sys::hipModuleLaunchKernel(
                f,
                shape.grid.0,
                shape.grid.1,
                shape.grid.2,
                shape.block.0,
                shape.block.1,
                shape.block.2,
                shape.shared_bytes,
                s,
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        };
        if e == sys::hipError_t::hipSuccess {
            Ok(())
        } else {
            Err(err_text(e))
        }
    }
}

/// The kernel parameters laid out as the device reads them: each at the next multiple of its
/// own alignment (pointers 8, 32-bit scalars 4), as a C struct of those fields would be.
/// Returned in u64 words (so the buffer itself is 8-aligned) with the exact byte length.
pub fn pack_args(args: &[Arg]) -> (Vec<u64>, usize) {
    let mut bytes: Vec<u8> = Vec::with_capacity(args.len() * 8);
    for a in args {
        let (b, align): ([u8; 8], usize) = match *a {
            Arg::Ptr(p) => (p.to_ne_bytes(), 8),
            Arg::I32(v) => (widen(v.to_ne_bytes()), 4),
            Arg::U32(v) => (widen(v.to_ne_bytes()), 4),
            Arg::F32(v) => (widen(v.to_ne_bytes()), 4),
        };
        bytes.resize(bytes.len().div_ceil(align) * align, 0);
        bytes.extend_from_slice(&b[..align]);
    }
    let len = bytes.len();
    let mut words = vec![0u64; len.div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    (words, len)
}

fn widen(b: [u8; 4]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64], len: usize) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take(len)
            .collect()
    }

    #[test]
    fn args_are_packed_at_their_natural_alignment() {
        // (ptr, i32, ptr): the second pointer moves to offset 16, like a C struct.
        let (w, len) = pack_args(&[Arg::Ptr(0x1122_3344_5566_7788), Arg::I32(-2), Arg::Ptr(7)]);
        assert_eq!(len, 24);
        let b = bytes(&w, len);
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[8..12], &(-2i32).to_ne_bytes());
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(&b[16..24], &7u64.to_ne_bytes());
        // Consecutive 32-bit scalars stay packed.
        let (w, len) = pack_args(&[Arg::Ptr(1), Arg::U32(3), Arg::F32(1.5), Arg::I32(9)]);
        assert_eq!(len, 20);
        let b = bytes(&w, len);
        assert_eq!(&b[8..12], &3u32.to_ne_bytes());
        assert_eq!(&b[12..16], &1.5f32.to_ne_bytes());
        assert_eq!(&b[16..20], &9i32.to_ne_bytes());
        assert_eq!(pack_args(&[]).1, 0);
    }
}
