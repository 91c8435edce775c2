//! Loaded kernel modules and launches.

use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use super::bind;
use super::driver::Stream;
use crate::backend::error::{BackendError, BackendResult};
/// Shared with HIP (`backend::gpu`); re-exported so `cuda::{Arg, LaunchShape}` keep working.
pub use crate::backend::gpu::{Arg, LaunchShape};

/// A module loaded from PTX or a cubin, unloaded on drop (after every [`Kernel`] from it).
#[derive(Debug)]
pub struct Module {
    ctx: Arc<CudaContext>,
    raw: sys::CUmodule,
    file: String,
}

// SAFETY: module handles are context objects usable from any thread with the context current.
unsafe impl Send for Module {}
// SAFETY: see Send; cuModuleGetFunction is thread-safe.
unsafe impl Sync for Module {}

impl Module {
    /// Loads `image` (NUL-terminated PTX or a cubin).
    pub(crate) fn load(
        ctx: &Arc<CudaContext>,
        file: &str,
        image: &[u8],
    ) -> BackendResult<Arc<Self>> {
        bind(ctx)?;
        // SAFETY: `image` is a complete PTX text (NUL-terminated by the compile step) or cubin,
        // alive for the call; the driver copies what it needs.
        let raw = unsafe { result::module::load_data(image.as_ptr().cast()) }.map_err(|e| {
            BackendError::Launch {
                kernel: file.to_string(),
                reason: format!("module load: {e}"),
            }
        })?;
        Ok(Arc::new(Self {
            ctx: Arc::clone(ctx),
            raw,
            file: file.to_string(),
        }))
    }

    /// The entry point `name`.
    pub fn kernel(self: &Arc<Self>, name: &str) -> BackendResult<Kernel> {
        let unknown = || BackendError::UnknownKernel {
            file: self.file.clone(),
            name: name.to_string(),
        };
        let c = CString::new(name).map_err(|_| unknown())?;
        bind(&self.ctx)?;
        // SAFETY: the module is loaded (owned by self) and `c` NUL-terminated.
        let raw = unsafe { result::module::get_function(self.raw, c) }.map_err(|_| unknown())?;
        Ok(Kernel {
            module: Arc::clone(self),
            raw,
            name: name.to_string(),
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: unloaded once; every Kernel holds an Arc to this module, so none is left.
            if let Err(e) = unsafe { result::module::unload(self.raw) } {
                tracing::warn!(error = %e, file = %self.file, "cuModuleUnload failed");
            }
        }
    }
}

/// An entry point of a loaded module.
#[derive(Debug, Clone)]
pub struct Kernel {
    module: Arc<Module>,
    raw: sys::CUfunction,
    name: String,
}

// SAFETY: function handles are immutable context objects; launches bind the context.
unsafe impl Send for Kernel {}
// SAFETY: see Send.
unsafe impl Sync for Kernel {}

impl Kernel {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues the kernel on `stream`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number and type, and every pointer must
    /// address device memory large enough for what the kernel reads and writes with these
    /// arguments, alive until the launch completed.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        bind(&self.module.ctx)?;
        // SAFETY: `raw` belongs to a loaded module (kept alive by `self.module`); `params`
        // points at `slots`, both alive for the call (the driver copies parameters at launch);
        // the argument contract is the caller's.
        unsafe {
            result::launch_kernel(
                self.raw,
                shape.grid,
                shape.block,
                shape.shared_bytes,
                stream.raw(),
                &mut params,
            )
        }
        .map_err(|e| BackendError::Launch {
            kernel: self.name.clone(),
            reason: e.to_string(),
        })
    }
}
