//! The vendor-neutral GPU forward pass: kernel launchers, the layer pass and the layered pass
//! of the pipelined runtime, written once against [`KernelDevice`] and run on CUDA and HIP.
//!
//! # Layout
//! - `mod.rs`     — [`KernelDevice`] (what the launchers need from a vendor: kernel lookup
//!   through its compile cache, an unsafe launch, synchronous buffer I/O, its GEMM library),
//!   [`Arg`] / [`LaunchShape`], [`GpuForwardError`] (device views: `backend::buffer`).
//! - `ops.rs`     — typed, checked launchers for every kernel in `kernels/` ([`GpuOps`]).
//! - `gemm.rs`    — the prefill GEMM seam ([`GemmF16`]) and the portable tiled kernel's launcher
//!   ([`PortableGemm`], `kernels/gemm.cu`).
//! - `layer.rs`   — one transformer layer ([`layer::run_layer`]), shared by the CUDA direct model
//!   and the layered pass.
//! - `layered.rs` — [`GpuLayered`], the `LayeredForward` the actors drive, for any vendor.
//!
//! Per vendor stays: the runtime (memory, streams, events, modules: `cuda/`, `hip/`), the
//! [`KernelDevice`] impl (`cuda/kernel_device.rs`, `hip/kernel_device.rs`), and the vendor GEMM
//! (cuBLAS on CUDA; none on HIP, see docs/HIP.md for why hipBLAS is not bound).

// The minimum Rust rose to 1.89 (2026-12-06) in a session without device time; these files'
// `a % b == 0` checks become `is_multiple_of` with their next device check, not blind.
#![allow(clippy::manual_is_multiple_of)]

pub mod gemm;
pub mod layer;
pub mod layered;
pub mod ops;

pub use gemm::{GemmF16, GemmF16Nt, PortableGemm};
pub use layered::{GpuLayered, LayeredOptions};
pub use ops::GpuOps;

pub use crate::backend::buffer::{view, BufferIo, View};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::ComputeDevice;
use crate::model::ModelError;

/// One kernel argument, passed by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
}

impl Arg {
    /// The argument's bytes at the start of an 8-byte slot (CUDA's `kernelParams` form: the
    /// driver reads exactly the parameter's size from the address it is given).
    pub fn slot(self) -> u64 {
        let mut b = [0u8; 8];
        match self {
            Arg::Ptr(p) => b = p.to_ne_bytes(),
            Arg::I32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            Arg::U32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            Arg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
        }
        u64::from_ne_bytes(b)
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// An entry point of a loaded module, launchable on one vendor's streams.
pub trait DeviceKernel: Send + Sync {
    type Stream;
    /// Queues the kernel on `stream`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number and type, and every pointer must
    /// address device memory large enough for what the kernel reads and writes with these
    /// arguments, alive until the launch completed.
    unsafe fn launch(
        &self,
        stream: &Self::Stream,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()>;
    /// [`launch`](Self::launch), allowed to start while the stream's previous kernel finishes
    /// (CUDA's programmatic dependent launch on sm_90 and later; elsewhere an ordinary launch).
    ///
    /// # Safety
    /// As [`launch`](Self::launch), and the kernel calls `rf_grid_wait()` (kernels/vendor.cuh)
    /// before it touches anything the previous kernel reads or writes.
    unsafe fn launch_early(
        &self,
        stream: &Self::Stream,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: the caller's contract includes `launch`'s.
        unsafe { self.launch(stream, shape, args) }
    }
}

/// A GPU the launchers in [`ops`] and the layer pass can drive: the [`ComputeDevice`] roles plus
/// kernels from `kernels/` (compiled by the vendor's run-time compiler through the shared
/// cache) and synchronous buffer I/O.
pub trait KernelDevice: ComputeDevice<Buf: BufferIo> + Send + Sync + Sized + 'static {
    type Kernel: DeviceKernel<Stream = Self::Stream>;
    /// `"CUDA"` or `"HIP"`, for messages.
    const VENDOR: &'static str;
    /// Entry point `entry` of kernel file `file` (`mmvq.cu`, `mmvq_q4_0_f32`), compiled for this
    /// device on first use and cached.
    fn kernel(&self, file: &str, entry: &str) -> BackendResult<Self::Kernel>;
    /// The vendor's GEMM library (cuBLAS), or why there is none: the layer pass then uses
    /// [`PortableGemm`]. Callable from any thread (the layer pass opens it on its own thread,
    /// [`gemm::DeferredGemm`], since loading cuBLAS takes ~0.1 s); the handle runs its work on
    /// the stream each call passes.
    fn vendor_gemm(&self) -> std::result::Result<Box<dyn GemmF16<Self>>, String>;
    /// Whether the batched q8 products may run on int8 tensor-core MMA (`_m*` kernels in
    /// mmvq_q8.cu): CUDA devices of compute capability 8.0 and later, unless
    /// `ROCMFORGE_GPU_MMA=0`. Elsewhere those kernels compute with dp4a and are not chosen.
    fn int8_mma(&self) -> bool {
        false
    }
}

/// Loads every kernel module the layer pass uses on a thread of its own (from the disk cache,
/// or compiled when the cache is cold), so the first forward pass finds them in memory: started
/// when the device opens, it overlaps the model's parsing and the first reads. A module that
/// fails here is only logged: the pass loads it again at first use and reports the error then.
pub fn preload_kernels<D: KernelDevice>(dev: std::sync::Arc<D>) {
    let spawned = std::thread::Builder::new()
        .name("rf-kernel-load".into())
        .spawn(move || {
            let _s = tracing::info_span!("kernel_preload").entered();
            // HIP builds have no tensor-core forms (the launcher never takes them there).
            for (file, names) in crate::backend::kernels::entry_points_for(D::VENDOR != "HIP") {
                // The size probe is for tests; the pass never launches it.
                if file == "quant_sizes.cu" {
                    continue;
                }
                for name in names {
                    if let Err(e) = dev.kernel(file, &name) {
                        tracing::debug!(file, name, error = %e, "kernel preload");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no thread to preload kernels on");
    }
}

/// Errors of the GPU forward passes (the layered pass here, CUDA's direct model).
#[derive(Debug, thiserror::Error)]
pub enum GpuForwardError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the GPU forward pass does not support this model yet: {0}")]
    Unsupported(String),
    #[error("weight budget of {budget} bytes is below the minimum of {needed} (global tensors plus two streaming slots)")]
    BudgetTooSmall { budget: usize, needed: usize },
}

pub type Result<T> = std::result::Result<T, GpuForwardError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arg_slots_hold_the_value_in_their_first_bytes() {
        assert_eq!(
            Arg::Ptr(0xdead_beef_0000_0001).slot(),
            0xdead_beef_0000_0001
        );
        let s = Arg::I32(-2).slot().to_ne_bytes();
        assert_eq!(&s[..4], &(-2i32).to_ne_bytes());
        assert_eq!(&s[4..], &[0; 4]);
        let s = Arg::F32(1.5).slot().to_ne_bytes();
        assert_eq!(&s[..4], &1.5f32.to_ne_bytes());
    }
}
