//! [`KernelDevice`] for [`CudaDevice`]: what the vendor-neutral launchers (`backend::gpu::ops`)
//! and layer pass need, mapped onto the CUDA runtime types (NVRTC module cache, `cuLaunchKernel`,
//! synchronous `cuMemcpy`, cuBLAS).

use super::blas::Blas;
use super::driver::Kernel;
use super::CudaDevice;
use crate::backend::error::BackendResult;
use crate::backend::gpu::{GemmF16, KernelDevice};

impl KernelDevice for CudaDevice {
    type Kernel = Kernel;
    const VENDOR: &'static str = "CUDA";

    fn kernel(&self, file: &str, entry: &str) -> BackendResult<Kernel> {
        CudaDevice::kernel(self, file, entry)
    }

    fn vendor_gemm(&self) -> Result<Box<dyn GemmF16<Self>>, String> {
        // cuBLAS binds the handle to the context current on this thread.
        super::bind(&self.ctx).map_err(|e| e.to_string())?;
        Ok(Box::new(Blas::create()?))
    }

    fn int8_mma(&self) -> bool {
        self.cc.0 >= 8 && !std::env::var(MMA_ENV).is_ok_and(|v| v.trim() == "0")
    }
}

/// `ROCMFORGE_GPU_MMA=0` keeps the batched q8 products off the tensor cores (for A/B runs).
const MMA_ENV: &str = "ROCMFORGE_GPU_MMA";
