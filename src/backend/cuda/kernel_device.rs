//! [`KernelDevice`] for [`CudaDevice`]: what the vendor-neutral launchers (`backend::gpu::ops`)
//! and layer pass need, mapped onto the CUDA runtime types (NVRTC module cache, `cuLaunchKernel`,
//! synchronous `cuMemcpy`, cuBLAS).

use super::blas::Blas;
use super::memory::{DeviceBuf, Pod};
use super::module::Kernel;
use super::stream::Stream;
use super::CudaDevice;
use crate::backend::error::BackendResult;
use crate::backend::gpu::{Arg, BufferIo, DeviceKernel, GemmF16, KernelDevice, LaunchShape};

impl BufferIo for DeviceBuf {
    fn write<T: Pod>(&self, offset: usize, src: &[T]) -> BackendResult<()> {
        DeviceBuf::write(self, offset, src)
    }
    fn read<T: Pod>(&self, offset: usize, dst: &mut [T]) -> BackendResult<()> {
        DeviceBuf::read(self, offset, dst)
    }
    fn zero(&self) -> BackendResult<()> {
        DeviceBuf::zero(self)
    }
}

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
