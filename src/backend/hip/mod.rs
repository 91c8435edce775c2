//! AMD GPUs through HIP: the seam the HIP issue fills in (same kernels via `kernels/vendor.cuh`,
//! same roles as `cuda/`). Until then the device cannot be constructed.

use super::error::{BackendError, BackendResult};
use std::sync::Arc;

/// A HIP device. Uninhabited for now: no value exists, so `Backend::Hip` cannot be reached.
#[derive(Debug)]
pub enum HipDevice {}

impl HipDevice {
    /// Without the `hip` feature: [`BackendError::NotCompiled`]. With it: not written yet
    /// (the HIP issue), reported as [`BackendError::NotImplemented`].
    pub fn open(_ordinal: usize) -> BackendResult<Arc<Self>> {
        if cfg!(feature = "hip") {
            Err(BackendError::NotImplemented {
                backend: "HIP",
                what: "device open (HIP issue)",
            })
        } else {
            Err(BackendError::NotCompiled {
                backend: "HIP",
                feature: "hip",
            })
        }
    }
}
