//! The pipelined runtime's CUDA compute: the vendor-neutral [`GpuLayered`] on a [`CudaDevice`].
//! The pass itself lives in `backend::gpu::layered` (the same code runs on HIP); these names
//! keep the CUDA spelling that the actors and the docs use.

use crate::backend::cuda::CudaDevice;
pub use crate::backend::gpu::layered::{GpuKv, GpuLayered, LayeredOptions};

/// [`GpuLayered`] on CUDA.
pub type CudaLayered = GpuLayered<CudaDevice>;
/// One sequence's KV cache on CUDA.
pub type CudaKv = GpuKv<CudaDevice>;
