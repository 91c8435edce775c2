//! [`KernelDevice`] for [`CudaDevice`]: what the vendor-neutral launchers (`backend::gpu::ops`)
//! and layer pass need, mapped onto the CUDA runtime types (NVRTC module cache, `cuLaunchKernel`,
//! synchronous `cuMemcpy`, cuBLAS).

use super::blas::Blas;
use super::driver::Stream;
use super::module::Kernel;
use super::CudaDevice;
use crate::backend::error::BackendResult;
use crate::backend::gpu::{Arg, DeviceKernel, GemmF16, KernelDevice, LaunchShape};

impl DeviceKernel for Kernel {
    type Stream = Stream;
    unsafe fn launch(
        &self,
        stream: &Stream,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: the caller upholds the argument contract, which is the same as this one's.
        unsafe { Kernel::launch(self, stream, shape, args) }
    }
}

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
}
