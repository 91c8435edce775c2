//! NVIDIA GPUs through `cudarc` (dynamic loading: a binary built without CUDA runs where CUDA
//! is present) and NVRTC (see `nvrtc.rs` for how the library is found).
//!
//! # Layout
//! - `mod.rs`    — [`CudaDevice`]: context, arch, module cache; implements `ComputeDevice`.
//! - `nvrtc.rs`  — run-time compiler, loaded with `dlopen` from any CUDA 12/13 install or wheel.
//! - `driver.rs` — [`CudaDriver`]: the driver API calls behind the vendor-neutral memory,
//!   stream, event, module and launch types (`backend::driver`: `DeviceBuf`, `PinnedBuf`,
//!   `Stream`, `Event`; `backend::module`: `Module`, `Kernel`), and the staging ring carved
//!   from one registered huge-page region.
//! - `kernel_device.rs` — `KernelDevice` for [`CudaDevice`]: the vendor-neutral launchers
//!   (`backend::gpu::ops`, re-exported here as `ops`) and layer pass run on it.
//! - `host.rs`   — `RegisteredHost`: a pre-faulted huge-page host region page-locked for copies
//!   (the pipeline's staging ring; `ComputeDevice::alloc_pinned_ring`).
//! - `blas.rs`   — cuBLAS f16 GEMM for prefill (`LayeredOptions::use_blas` turns it off).
//!
//! The forward pass is the vendor-neutral `backend::gpu::GpuLayered` (`CudaLayered` below),
//! driven by the actors' pipeline: the one engine.

pub mod blas;
pub mod driver;
pub mod host;
mod kernel_device;
pub mod nvrtc;
pub use super::gpu::ops;

/// The vendor-neutral layer pass on CUDA.
pub type CudaLayered = crate::backend::gpu::GpuLayered<CudaDevice>;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, DriverError};

pub use crate::backend::buffer::Pod;
pub use crate::backend::gpu::{Arg, LaunchShape};
pub use driver::{CudaDriver, DeviceBuf, Event, Kernel, Module, PinnedBuf, Stream};
pub use nvrtc::Nvrtc;

use super::compile_cache::{CacheHit, CompileKey, KernelCache, OutputKind};
use super::error::{BackendError, BackendResult};
use super::ComputeDevice;

pub(crate) fn drv_err(op: &'static str, e: DriverError) -> BackendError {
    BackendError::Driver {
        backend: "CUDA",
        op,
        reason: e.to_string(),
    }
}

/// Makes `ctx` current on the calling thread (a no-op when it already is).
pub(crate) fn bind(ctx: &Arc<CudaContext>) -> BackendResult<()> {
    ctx.bind_to_thread()
        .map_err(|e| drv_err("cuCtxSetCurrent", e))
}

/// Whether the CUDA driver library can be loaded at all (no device needed).
pub fn driver_present() -> bool {
    // SAFETY: only tries dlopen on cudarc's candidate names; loads nothing else.
    unsafe { sys::is_culib_present() }
}

type ModuleKey = (String, Vec<(String, String)>);

/// One CUDA device with its primary context.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    drv: Arc<CudaDriver>,
    ordinal: usize,
    name: String,
    cc: (i32, i32),
    warp: u32,
    cache: KernelCache,
    modules: Mutex<HashMap<ModuleKey, Arc<Module>>>,
}

impl CudaDevice {
    /// Opens device `ordinal`. No driver library or no device is [`BackendError::NoDevice`].
    pub fn open(ordinal: usize) -> BackendResult<Arc<Self>> {
        let no_dev = |reason: String| BackendError::NoDevice {
            backend: "CUDA",
            reason,
        };
        if !driver_present() {
            return Err(no_dev(
                "libcuda.so not found (no NVIDIA driver installed)".into(),
            ));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| no_dev(format!("device {ordinal}: {e}")))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| drv_err("cuDeviceGetAttribute", e))?;
        let warp = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_WARP_SIZE)
            .map_err(|e| drv_err("cuDeviceGetAttribute", e))?;
        let name = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        Ok(Arc::new(Self {
            drv: Arc::new(CudaDriver::new(Arc::clone(&ctx), cc)),
            ctx,
            ordinal,
            name,
            cc,
            warp: u32::try_from(warp).unwrap_or(32),
            cache: KernelCache::from_env(),
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `sm_90`-style target of this device.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// The compiled module of `file` (with `defines`), from memory, the disk cache or NVRTC.
    /// A cached module the driver refuses (damaged, or built by an NVRTC newer than the
    /// driver) is compiled again with the NVRTC found now and replaces the cached one.
    pub fn module(
        &self,
        file: &str,
        defines: &[(String, String)],
    ) -> BackendResult<(Arc<Module>, CacheHit)> {
        let key: ModuleKey = (file.to_string(), defines.to_vec());
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mods.get(&key) {
            return Ok((Arc::clone(m), CacheHit::Memory));
        }
        let (image, hit) = compile(&self.cache, file, &self.arch(), defines, OutputKind::Binary)?;
        let m = match Module::load(&self.drv, file, &image) {
            Ok(m) => m,
            Err(e) if hit != CacheHit::Compiled => {
                tracing::warn!(file, error = %e, "cached kernel module refused; compiling again");
                let image = recompile(&self.cache, file, &self.arch(), defines)?;
                Module::load(&self.drv, file, &image)?
            }
            Err(e) => return Err(e),
        };
        mods.insert(key, Arc::clone(&m));
        Ok((m, hit))
    }

    /// Entry point `name` of kernel file `file` (compiled without defines).
    pub fn kernel(&self, file: &str, name: &str) -> BackendResult<Kernel> {
        self.module(file, &[])?.0.kernel(name)
    }

    pub fn upload<T: Pod>(&self, data: &[T], what: &str) -> BackendResult<DeviceBuf> {
        DeviceBuf::upload(&self.drv, data, what)
    }

    /// Waits for all work on every stream of this device.
    pub fn synchronize(&self) -> BackendResult<()> {
        bind(&self.ctx)?;
        self.ctx
            .synchronize()
            .map_err(|e| drv_err("cuCtxSynchronize", e))
    }
}

/// Compiles `file` for `arch` through the cache and NVRTC. Needs no device: the CI check and
/// the GPU-less tests call it directly.
pub fn compile(
    cache: &KernelCache,
    file: &str,
    arch: &str,
    defines: &[(String, String)],
    output: OutputKind,
) -> BackendResult<(Arc<Vec<u8>>, CacheHit)> {
    let source = crate::kernels::source(file).ok_or_else(|| BackendError::UnknownKernel {
        file: file.to_string(),
        name: "*".into(),
    })?;
    compile_source(cache, file, source, arch, defines, output)
}

/// As [`compile`] for a source that is not an embedded file (generated checks).
///
/// A full cache hit does not load NVRTC: the cache's compiler stamp (see `compile_cache.rs`)
/// names the NVRTC version that built it as long as that library file is unchanged. Only a miss
/// loads NVRTC (which also refreshes the stamp).
pub fn compile_source(
    cache: &KernelCache,
    file: &str,
    source: &str,
    arch: &str,
    defines: &[(String, String)],
    output: OutputKind,
) -> BackendResult<(Arc<Vec<u8>>, CacheHit)> {
    let headers = super::kernels::headers();
    let mut sources: Vec<&str> = vec![source];
    sources.extend(headers.iter().map(|(_, t)| *t));
    let key = CompileKey {
        file: file.to_string(),
        arch: arch.to_string(),
        defines: defines.to_vec(),
        output,
    };
    if let Some(compiler) = cache.stamped_compiler(NVRTC_STAMP, &nvrtc_search_env()) {
        if let Some(hit) = cache.lookup(&key, &sources, &compiler) {
            return Ok(hit);
        }
    }
    let (nvrtc, compiler) = nvrtc_stamped(cache)?;
    cache.get_or_compile(&key, &sources, &compiler, || {
        nvrtc.compile(file, source, &headers, arch, defines, output)
    })
}

/// Compiles `file` with NVRTC regardless of the cache and replaces the cached module.
fn recompile(
    cache: &KernelCache,
    file: &str,
    arch: &str,
    defines: &[(String, String)],
) -> BackendResult<Arc<Vec<u8>>> {
    let source = crate::kernels::source(file).ok_or_else(|| BackendError::UnknownKernel {
        file: file.to_string(),
        name: "*".into(),
    })?;
    let headers = super::kernels::headers();
    let mut sources: Vec<&str> = vec![source];
    sources.extend(headers.iter().map(|(_, t)| *t));
    let key = CompileKey {
        file: file.to_string(),
        arch: arch.to_string(),
        defines: defines.to_vec(),
        output: OutputKind::Binary,
    };
    let (nvrtc, compiler) = nvrtc_stamped(cache)?;
    let image = nvrtc.compile(file, source, &headers, arch, defines, OutputKind::Binary)?;
    Ok(cache.store(&key, &sources, &compiler, image))
}

/// Name of NVRTC's compiler stamp in the kernel cache.
const NVRTC_STAMP: &str = "nvrtc";

/// NVRTC (loaded now if it was not) and its compiler string, recording the stamp for the next
/// start.
fn nvrtc_stamped(cache: &KernelCache) -> BackendResult<(Nvrtc, String)> {
    let nvrtc = Nvrtc::get()?;
    let (maj, min) = nvrtc.version();
    let compiler = format!("nvrtc-{maj}.{min}");
    if let Some(lib) = loaded_library_file("libnvrtc.so") {
        cache.write_stamp(NVRTC_STAMP, &lib, &nvrtc_search_env(), &compiler);
    }
    Ok((nvrtc, compiler))
}

/// Everything that steers the NVRTC search (`nvrtc.rs`): a stamp is valid only under the same.
fn nvrtc_search_env() -> String {
    [
        nvrtc::NVRTC_ENV,
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_ROOT",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
    ]
    .iter()
    .map(|k| format!("{k}={}", std::env::var(k).unwrap_or_default()))
    .collect::<Vec<_>>()
    .join(";")
}

/// The file a loaded shared library whose name starts with `stem` was mapped from (Linux:
/// `/proc/self/maps`), so a stamp names the real file even when NVRTC was found by soname.
fn loaded_library_file(stem: &str) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(stem))
        })
        .map(std::path::PathBuf::from)
}

/// Whether a start is likely to need NVRTC (no valid compiler stamp in the kernel cache: a
/// first start, a new NVRTC, or no disk cache). The CLI preloads NVRTC during CUDA init then.
pub fn nvrtc_needed_soon() -> bool {
    KernelCache::from_env()
        .stamped_compiler(NVRTC_STAMP, &nvrtc_search_env())
        .is_none()
}

impl ComputeDevice for CudaDevice {
    type Buf = DeviceBuf;
    type Pinned = PinnedBuf;
    type Stream = Stream;
    type Event = Event;

    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.arch())
    }

    fn warp_size(&self) -> u32 {
        self.warp
    }

    fn mem_info(&self) -> BackendResult<(usize, usize)> {
        crate::backend::driver::Driver::mem_info(&*self.drv)
    }

    fn alloc(&self, bytes: usize, what: &str) -> BackendResult<DeviceBuf> {
        DeviceBuf::alloc(&self.drv, bytes, what)
    }

    fn alloc_pinned(&self, bytes: usize) -> BackendResult<PinnedBuf> {
        PinnedBuf::alloc(&self.drv, bytes)
    }

    fn alloc_pinned_ring(
        &self,
        n: usize,
        bytes: usize,
        region: Option<crate::backend::host::HostRegion>,
    ) -> BackendResult<Vec<PinnedBuf>> {
        driver::pinned_ring(&self.drv, n, bytes, region)
    }

    fn new_stream(&self) -> BackendResult<Stream> {
        Stream::new(&self.drv)
    }

    fn new_event(&self, timing: bool) -> BackendResult<Event> {
        Event::new(&self.drv, timing)
    }

    unsafe fn copy_htod_async(
        &self,
        stream: &Stream,
        dst: &DeviceBuf,
        dst_off: usize,
        src: &PinnedBuf,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()> {
        // SAFETY: liveness until the copy completed is this function's own contract, passed on.
        unsafe { stream.copy_htod_async(dst, dst_off, src, src_off, len) }
    }
}
