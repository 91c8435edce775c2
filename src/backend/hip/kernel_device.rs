//! [`KernelDevice`] for [`HipDevice`]: the vendor-neutral launchers (`backend::gpu::ops`), the
//! layer pass and `GpuLayered` run on AMD GPUs through this (hipRTC module cache,
//! `hipModuleLaunchKernel`, synchronous `hipMemcpy`). No vendor GEMM: hipBLAS is not bound (its
//! ABI changed between ROCm 5 and 6/7 and cannot be checked here), so prefill GEMMs run the
//! portable `kernels/gemm.cu`.
//!
//! Warp width: launch shapes come from `warp_size()`, which `HipDevice::open` has checked
//! against the width the compiler gives `RF_WARP` for the device's target (64 on CDNA, 32 on
//! RDNA), so host shapes and device code agree.

use super::device::HipDevice;
use super::driver::Kernel;
use crate::backend::error::BackendResult;
use crate::backend::gpu::{GemmF16, KernelDevice};

impl KernelDevice for HipDevice {
    type Kernel = Kernel;
    const VENDOR: &'static str = "HIP";

    fn kernel(&self, file: &str, entry: &str) -> BackendResult<Kernel> {
        HipDevice::kernel(self, file, entry)
    }

    fn vendor_gemm(&self) -> Result<Box<dyn GemmF16<Self>>, String> {
        Err("hipBLAS is not bound (docs/HIP.md)".into())
    }
}
