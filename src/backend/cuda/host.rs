//! [`RegisteredHost`]: a [`HostRegion`] (huge-page host memory faulted in before CUDA exists,
//! `backend/host.rs`) page-locked for the device with `cuMemHostRegister`. Where registration
//! fails, rings fall back to `cuMemHostAlloc`.

use super::{bind, drv_err};
use crate::backend::error::BackendResult;
pub use crate::backend::host::HostRegion;
use cudarc::driver::{sys, CudaContext};
use std::sync::Arc;

/// A [`HostRegion`] page-locked for the device (`cuMemHostRegister`), unregistered on drop.
#[derive(Debug)]
pub struct RegisteredHost {
    ctx: Arc<CudaContext>,
    region: HostRegion,
}

impl RegisteredHost {
    pub fn register(ctx: &Arc<CudaContext>, region: HostRegion) -> BackendResult<Self> {
        bind(ctx)?;
        // SAFETY: the range is our own live mapping, faulted in; flags 0 = plain pinned memory
        // for this context. It is unregistered before it is unmapped (drop below).
        unsafe { sys::cuMemHostRegister_v2(region.as_mut_ptr().cast(), region.len(), 0) }
            .result()
            .map_err(|e| drv_err("cuMemHostRegister", e))?;
        Ok(Self {
            ctx: Arc::clone(ctx),
            region,
        })
    }

    pub fn len(&self) -> usize {
        self.region.len()
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    pub fn huge(&self) -> bool {
        self.region.huge
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.region.as_mut_ptr()
    }
}

impl Drop for RegisteredHost {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: registered in `register`; the ring drains every copy reading it before
            // it drops this memory. The region is unmapped after this (field drop).
            if let Err(e) =
                unsafe { sys::cuMemHostUnregister(self.region.as_mut_ptr().cast()) }.result()
            {
                tracing::warn!(error = %e, "cuMemHostUnregister failed");
            }
        }
    }
}
