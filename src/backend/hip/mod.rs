//! AMD GPUs through HIP: the same kernels as CUDA (through `kernels/vendor.cuh`), the same roles
//! (device, memory, streams, events, modules) and the same error type.
//!
//! # Layout
//! - `mod.rs`    — kernel compilation for AMD (always built: hipRTC is loaded with `dlopen`, so
//!   the compile check runs without the `hip` feature and without a GPU), arch helpers.
//! - `hiprtc.rs` — the hipRTC loader (why hipRTC rather than `hipcc --genco`: see there).
//! - `device.rs`, `driver.rs` — the runtime on `hip-runtime-sys`, only with the cargo feature
//!   `hip` (it links `libamdhip64`). `driver.rs` is `HipDriver`: the runtime calls behind the
//!   vendor-neutral memory, stream, event, module and launch types (`backend::driver`,
//!   `backend::module`).
//! - `kernel_device.rs` — `KernelDevice` for [`HipDevice`]: the vendor-neutral forward pass
//!   (`backend::gpu`: launchers, layer pass, `GpuLayered`) runs on it (feature `hip`).
//!
//! Status: compile-checked for gfx90a and gfx1030 and tested on the no-device path only. No
//! part of the device runtime or the forward pass has run on AMD hardware yet (docs/HIP.md).

pub mod hiprtc;

#[cfg(feature = "hip")]
mod device;
#[cfg(feature = "hip")]
pub mod driver;
#[cfg(feature = "hip")]
mod kernel_device;

#[cfg(feature = "hip")]
pub use crate::backend::gpu::{Arg, LaunchShape};
#[cfg(feature = "hip")]
pub use device::{driver_version, HipDevice};
#[cfg(feature = "hip")]
pub use driver::{pack_args, DeviceBuf, Event, HipDriver, Kernel, Module, PinnedBuf, Stream};

/// [`crate::backend::gpu::GpuLayered`] on HIP: the pipelined runtime's compute on AMD GPUs.
#[cfg(feature = "hip")]
pub type HipLayered = crate::backend::gpu::GpuLayered<HipDevice>;

pub use hiprtc::HipRtc;

use std::sync::Arc;

use super::compile_cache::{CacheHit, CompileKey, KernelCache, OutputKind};
use super::error::{BackendError, BackendResult};

/// The targets every kernel is compile-checked for: CDNA2 (MI200, wave64) and RDNA2 (wave32).
pub const CHECKED_ARCHS: [&str; 2] = ["gfx90a", "gfx1030"];

/// The processor of a target id: `gfx90a:sramecc+:xnack-` -> `gfx90a`.
pub fn base_arch(target_id: &str) -> &str {
    target_id.split(':').next().unwrap_or(target_id).trim()
}

/// Default wavefront width of a `gfx` target: 64 for GCN/CDNA (gfx8, gfx9: gfx900 ... gfx90a,
/// gfx942), 32 for RDNA (gfx10, gfx11, gfx12; their default mode is wave32). `None` for a
/// name that is not `gfx` followed by a processor number.
pub fn wavefront_size(target_id: &str) -> Option<u32> {
    let proc_ = base_arch(target_id).strip_prefix("gfx")?;
    // The last two characters are minor and stepping (hex), the rest the major version.
    if proc_.len() < 3 || !proc_.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let major: u32 = proc_[..proc_.len() - 2].parse().ok()?;
    Some(if major >= 10 { 32 } else { 64 })
}

/// A translation unit that fails to compile unless the kernels' `RF_WARP` equals the wavefront
/// width the host expects for `target_id` (so host launch shapes and device code agree).
pub fn wavefront_check_source(target_id: &str) -> BackendResult<String> {
    let w = wavefront_size(target_id).ok_or_else(|| BackendError::InvalidArgument {
        op: "wavefront_check_source",
        what: format!("{target_id:?} is not a gfx target"),
    })?;
    Ok(format!(
        "#include \"common.cuh\"\nstatic_assert(RF_WARP == {w}, \"RF_WARP must be {w} on {target_id}\");\n\
         static_assert(RF_MAX_WARPS * RF_WARP == RF_MAX_THREADS, \"block scratch sized by RF_WARP\");\n"
    ))
}

/// Compiles the embedded kernel `file` for `arch` through the cache and hipRTC. Needs no device
/// (and not the `hip` feature): the CI check and the GPU-less tests call it directly.
pub fn compile(
    cache: &KernelCache,
    file: &str,
    arch: &str,
    defines: &[(String, String)],
) -> BackendResult<(Arc<Vec<u8>>, CacheHit)> {
    let source = crate::kernels::source(file).ok_or_else(|| BackendError::UnknownKernel {
        file: file.to_string(),
        name: "*".into(),
    })?;
    compile_source(cache, file, source, arch, defines)
}

/// As [`compile`] for a source that is not an embedded file (generated checks). The result is
/// an AMD code object (an ELF for `amdgcn-amd-amdhsa`), loadable with `hipModuleLoadData`.
pub fn compile_source(
    cache: &KernelCache,
    file: &str,
    source: &str,
    arch: &str,
    defines: &[(String, String)],
) -> BackendResult<(Arc<Vec<u8>>, CacheHit)> {
    let rtc = HipRtc::get()?;
    let headers = super::kernels::headers();
    let mut sources: Vec<&str> = vec![source];
    sources.extend(headers.iter().map(|(_, t)| *t));
    let (maj, min) = rtc.version();
    let compiler = format!("hiprtc-{maj}.{min}");
    let key = CompileKey {
        file: file.to_string(),
        arch: arch.to_string(),
        defines: defines.to_vec(),
        output: OutputKind::Binary,
    };
    cache.get_or_compile(&key, &sources, &compiler, || {
        rtc.compile(file, source, &headers, arch, defines)
    })
}

/// Without the `hip` feature no HIP device type exists: uninhabited, so `Backend::Hip` cannot
/// be reached and [`HipDevice::open`] says how to enable it.
#[cfg(not(feature = "hip"))]
#[derive(Debug)]
pub enum HipDevice {}

#[cfg(not(feature = "hip"))]
impl HipDevice {
    /// Always [`BackendError::NotCompiled`] (the cargo feature `hip` is off).
    pub fn open(_ordinal: usize) -> BackendResult<Arc<Self>> {
        Err(BackendError::NotCompiled {
            backend: "HIP",
            feature: "hip",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wavefront_width_per_generation() {
        for (t, w) in [
            ("gfx90a", Some(64)),
            ("gfx90a:sramecc+:xnack-", Some(64)),
            ("gfx906", Some(64)),
            ("gfx942", Some(64)),
            ("gfx803", Some(64)),
            ("gfx1030", Some(32)),
            ("gfx1100", Some(32)),
            ("gfx1201", Some(32)),
            ("sm_90", None),
            ("gfx", None),
            ("gfxzz", None),
        ] {
            assert_eq!(wavefront_size(t), w, "{t}");
        }
        assert_eq!(base_arch("gfx90a:xnack+"), "gfx90a");
    }

    #[test]
    fn wavefront_check_names_the_width() {
        assert!(wavefront_check_source("gfx90a")
            .expect("gfx")
            .contains("RF_WARP == 64"));
        assert!(wavefront_check_source("gfx1030")
            .expect("gfx")
            .contains("RF_WARP == 32"));
        assert!(wavefront_check_source("sm_80").is_err());
    }
}
