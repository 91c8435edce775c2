//! [`CudaDriver`]: the CUDA driver API calls behind the vendor-neutral memory, stream, event,
//! module and launch types (`backend::driver`, `backend::module`), through `cudarc`'s `result`
//! layer; and the CUDA-only staging ring carved from one registered huge-page region.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, DriverError};

use super::host::{HostRegion, RegisteredHost};
use super::{bind, drv_err};
use crate::backend::driver::{self, Driver, HostAllocError};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::gpu::{Arg, LaunchShape};
use crate::backend::module;

/// One CUDA device's primary context: every call binds it to the calling thread first.
#[derive(Debug)]
pub struct CudaDriver {
    pub(crate) ctx: Arc<CudaContext>,
    /// `launch_early` uses programmatic dependent launch (compute capability 9.0 and later,
    /// unless `ROCMFORGE_GPU_PDL=0`).
    pub(crate) pdl: bool,
}

/// `ROCMFORGE_GPU_PDL=0` turns programmatic dependent launch off (for A/B runs).
pub const PDL_ENV: &str = "ROCMFORGE_GPU_PDL";

impl CudaDriver {
    pub(crate) fn new(ctx: Arc<CudaContext>, cc: (i32, i32)) -> Self {
        let off = std::env::var(PDL_ENV).is_ok_and(|v| v.trim() == "0");
        Self {
            ctx,
            pdl: cc.0 >= 9 && !off,
        }
    }
}

/// `kernelParams` for a launch: one pointer per parameter, each to an 8-byte slot of `slots`.
fn kernel_params(slots: &mut [u64]) -> Vec<*mut c_void> {
    slots
        .iter_mut()
        .map(|s| (s as *mut u64).cast::<c_void>())
        .collect()
}

pub type DeviceBuf = driver::DeviceBuf<CudaDriver>;
pub type PinnedBuf = driver::PinnedBuf<CudaDriver>;
pub type Stream = driver::Stream<CudaDriver>;
pub type Event = driver::Event<CudaDriver>;
pub type Module = module::Module<CudaDriver>;
pub type Kernel = module::Kernel<CudaDriver>;

fn call(op: &'static str, r: sys::CUresult) -> BackendResult<()> {
    r.result().map_err(|e| drv_err(op, e))
}

// SAFETY: every method is the documented driver call for its role, made with the context
// current; handles come from the matching create calls.
unsafe impl Driver for CudaDriver {
    const VENDOR: &'static str = "CUDA";
    type RawStream = sys::CUstream;
    type RawEvent = sys::CUevent;
    type RawModule = sys::CUmodule;
    type RawFunction = sys::CUfunction;

    fn mem_info(&self) -> BackendResult<(usize, usize)> {
        bind(&self.ctx)?;
        self.ctx
            .mem_get_info()
            .map_err(|e| drv_err("cuMemGetInfo", e))
    }

    fn malloc(&self, bytes: usize) -> BackendResult<Option<u64>> {
        bind(&self.ctx)?;
        // SAFETY: the context is current; the memory is only handed out as raw bytes.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Some(ptr)),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => Ok(None),
            Err(e) => Err(drv_err("cuMemAlloc", e)),
        }
    }

    unsafe fn free(&self, ptr: u64) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract (from cuMemAlloc, freed once).
        unsafe { result::free_sync(ptr) }.map_err(|e| drv_err("cuMemFree", e))
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the destination range is live (caller); `src` is valid for reads.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| drv_err("cuMemcpyHtoD", e))
    }

    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the source range is live (caller); `dst` is valid for writes.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| drv_err("cuMemcpyDtoH", e))
    }

    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the range is live (caller).
        call("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(dst, 0, bytes) })
    }

    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, HostAllocError> {
        bind(&self.ctx).map_err(|e| e.to_string())?;
        // SAFETY: the context is current; flag 0 = plain pinned memory.
        let p = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| e.to_string())?;
        Ok(p.cast())
    }

    unsafe fn host_free(&self, ptr: *mut u8) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract (from cuMemHostAlloc, freed once).
        unsafe { result::free_host(ptr.cast()) }.map_err(|e| drv_err("cuMemFreeHost", e))
    }

    fn stream_create(&self) -> BackendResult<sys::CUstream> {
        bind(&self.ctx)?;
        result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| drv_err("cuStreamCreate", e))
    }

    unsafe fn stream_destroy(&self, s: sys::CUstream) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::stream::destroy(s) }.map_err(|e| drv_err("cuStreamDestroy", e))
    }

    unsafe fn stream_synchronize(&self, s: sys::CUstream) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::stream::synchronize(s) }.map_err(|e| drv_err("cuStreamSynchronize", e))
    }

    unsafe fn stream_wait(&self, s: sys::CUstream, e: sys::CUevent) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::stream::wait_event(s, e, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(|e| drv_err("cuStreamWaitEvent", e))
    }

    unsafe fn copy_htod_async(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
        s: sys::CUstream,
    ) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract (live ranges until the copy completed).
        call("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, s)
        })
    }

    fn event_create(&self, timing: bool) -> BackendResult<sys::CUevent> {
        bind(&self.ctx)?;
        // Events without timing mark copies and fences; the host waits on them only on threads
        // that recycle staging slots or free memory, so those waits sleep (BLOCKING_SYNC)
        // instead of spinning a core the disk readers need. (Decode waits on its stream, not
        // on an event, and keeps the spinning wait.)
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
                | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
        };
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: the context is current; `raw` is written by the driver on success and read
        // only then.
        unsafe {
            call("cuEventCreate", sys::cuEventCreate(raw.as_mut_ptr(), flags))?;
            Ok(raw.assume_init())
        }
    }

    unsafe fn event_destroy(&self, e: sys::CUevent) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::event::destroy(e) }.map_err(|e| drv_err("cuEventDestroy", e))
    }

    unsafe fn event_record(&self, e: sys::CUevent, s: sys::CUstream) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::event::record(e, s) }.map_err(|e| drv_err("cuEventRecord", e))
    }

    unsafe fn event_synchronize(&self, e: sys::CUevent) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::event::synchronize(e) }.map_err(|e| drv_err("cuEventSynchronize", e))
    }

    unsafe fn event_query(&self, e: sys::CUevent) -> BackendResult<bool> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        match unsafe { result::event::query(e) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(drv_err("cuEventQuery", e)),
        }
    }

    unsafe fn event_elapsed_ms(
        &self,
        start: sys::CUevent,
        end: sys::CUevent,
    ) -> BackendResult<f32> {
        bind(&self.ctx)?;
        // SAFETY: the caller's contract.
        unsafe { result::event::elapsed(start, end) }.map_err(|e| drv_err("cuEventElapsedTime", e))
    }

    fn make_current(&self) -> BackendResult<()> {
        bind(&self.ctx)
    }

    unsafe fn module_load(&self, image: &[u8]) -> Result<sys::CUmodule, String> {
        // SAFETY: the caller's contract: the context is current and `image` a complete cubin
        // or NUL-terminated PTX, alive for the call (the driver copies what it needs).
        unsafe { result::module::load_data(image.as_ptr().cast()) }.map_err(|e| e.to_string())
    }

    unsafe fn module_unload(&self, m: sys::CUmodule) -> Result<(), String> {
        // SAFETY: the caller's contract (loaded, unloaded once, nothing launched after).
        unsafe { result::module::unload(m) }.map_err(|e| e.to_string())
    }

    unsafe fn module_function(&self, m: sys::CUmodule, name: &CStr) -> Option<sys::CUfunction> {
        // SAFETY: the caller's contract (context current, module loaded); `name` is
        // NUL-terminated.
        unsafe { result::module::get_function(m, name.to_owned()) }.ok()
    }

    unsafe fn launch(
        &self,
        f: sys::CUfunction,
        shape: LaunchShape,
        s: sys::CUstream,
        args: &[Arg],
    ) -> Result<(), String> {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params = kernel_params(&mut slots);
        // SAFETY: `f`'s module is loaded and `s` live (caller); `params` points at `slots`,
        // both alive for the call (the driver copies parameters at launch); the argument
        // contract is the caller's.
        unsafe {
            result::launch_kernel(
                f,
                shape.grid,
                shape.block,
                shape.shared_bytes,
                s,
                &mut params,
            )
        }
        .map_err(|e| e.to_string())
    }

    unsafe fn launch_early(
        &self,
        f: sys::CUfunction,
        shape: LaunchShape,
        s: sys::CUstream,
        args: &[Arg],
    ) -> Result<(), String> {
        if !self.pdl {
            // SAFETY: the caller's contract includes `launch`'s.
            return unsafe { self.launch(f, shape, s, args) };
        }
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params = kernel_params(&mut slots);
        // SAFETY: an all-zero attribute is a valid value of this plain C struct (the union's
        // pad covers it); the fields that matter are set just below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: shape.grid.0,
            gridDimY: shape.grid.1,
            gridDimZ: shape.grid.2,
            blockDimX: shape.block.0,
            blockDimY: shape.block.1,
            blockDimZ: shape.block.2,
            sharedMemBytes: shape.shared_bytes,
            hStream: s,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as `launch` (module loaded, stream live, `params` pointing at `slots`, both
        // alive for the call); `config` and `attr` outlive the call; the kernel waits before
        // touching the previous kernel's data (the caller's contract).
        unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| e.to_string())
    }
}

/// `n` pinned buffers of `bytes` each, carved from one huge-page region (`region` when it is
/// large enough, else one faulted in here) registered once (`cuMemHostRegister`): for a staging
/// ring this replaces `n` calls of `cuMemHostAlloc` (H100: ~1.4 ms per 4 MiB) by one
/// registration (~2 ms per 64 MiB), and positional reads into 2 MiB pages run faster than into
/// 4 KiB ones (fewer TLB misses). Falls back to `n` separate allocations where the registration
/// is refused.
pub(crate) fn pinned_ring(
    drv: &Arc<CudaDriver>,
    n: usize,
    bytes: usize,
    region: Option<HostRegion>,
) -> BackendResult<Vec<PinnedBuf>> {
    // Slices stay 4 KiB aligned (page-aligned `pread` targets and copy sources).
    let stride = bytes.max(1).div_ceil(4096) * 4096;
    let total = stride.checked_mul(n).ok_or(BackendError::PinnedAlloc {
        requested: usize::MAX,
        reason: format!("{n} slots of {bytes} B overflow"),
    })?;
    let region = match region {
        Some(r) if r.len() >= total => Ok(r),
        _ => HostRegion::new(total),
    };
    let registered = region.and_then(|region| RegisteredHost::register(&drv.ctx, region));
    let region = match registered {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::info!(error = %e, "pinned ring: registration refused, allocating slots");
            return (0..n).map(|_| PinnedBuf::alloc(drv, bytes)).collect();
        }
    };
    Ok((0..n)
        .map(|i| {
            // SAFETY: `i * stride + bytes <= total <= region.len()`: inside the mapping, which
            // is initialised (faulted in by `HostRegion`) and registered while `region` lives;
            // slices are `stride >= bytes` apart, so they never overlap.
            unsafe { PinnedBuf::slice_of(drv, region.clone(), region.ptr().add(i * stride), bytes) }
        })
        .collect())
}
