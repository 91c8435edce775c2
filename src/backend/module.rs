//! Loaded kernel modules and launches, written once over [`Driver`]: a vendor supplies only
//! the raw calls (load, entry-point lookup, launch, unload); the RAII [`Module`], the
//! [`Kernel`] that keeps its module alive, and the errors that name the file and the kernel
//! live here, so CUDA and HIP cannot drift apart.

use std::ffi::CString;
use std::sync::Arc;

use super::driver::{Driver, Stream};
use super::error::{BackendError, BackendResult};
use super::gpu::{Arg, DeviceKernel, LaunchShape};

/// A module loaded from a compiled image, unloaded on drop (after every [`Kernel`] from it:
/// each holds an `Arc` to its module).
#[derive(Debug)]
pub struct Module<D: Driver> {
    drv: Arc<D>,
    raw: D::RawModule,
    file: String,
}

// SAFETY: the `Driver` contract makes module handles usable from any thread (every call here
// makes the device current first), and entry-point lookup is thread-safe on both runtimes.
unsafe impl<D: Driver> Send for Module<D> {}
// SAFETY: see Send; `&Module` only looks up entry points.
unsafe impl<D: Driver> Sync for Module<D> {}

impl<D: Driver> Module<D> {
    /// Loads `image`, the output of this crate's compile step for kernel file `file` (a cubin
    /// or NUL-terminated PTX from NVRTC, an AMD code object from hipRTC). Crate-private so no
    /// other image reaches the loader. A refused image is [`BackendError::Launch`] naming `file`.
    pub(crate) fn load(drv: &Arc<D>, file: &str, image: &[u8]) -> BackendResult<Arc<Self>> {
        drv.make_current()?;
        // SAFETY: the device is current (above); `image` is a complete image from the compile
        // step (see above), alive for the call (the runtime copies what it needs).
        let raw = unsafe { drv.module_load(image) }.map_err(|e| BackendError::Launch {
            kernel: file.to_string(),
            reason: format!("module load: {e}"),
        })?;
        Ok(Arc::new(Self {
            drv: Arc::clone(drv),
            raw,
            file: file.to_string(),
        }))
    }

    /// The entry point `name` ([`BackendError::UnknownKernel`] when the module has none).
    pub fn kernel(self: &Arc<Self>, name: &str) -> BackendResult<Kernel<D>> {
        let unknown = || BackendError::UnknownKernel {
            file: self.file.clone(),
            name: name.to_string(),
        };
        let c = CString::new(name).map_err(|_| unknown())?;
        self.drv.make_current()?;
        // SAFETY: the device is current (above) and the module is loaded (owned by `self`).
        let raw = unsafe { self.drv.module_function(self.raw, &c) }.ok_or_else(unknown)?;
        Ok(Kernel {
            module: Arc::clone(self),
            raw,
            name: name.to_string(),
        })
    }
}

impl<D: Driver> Drop for Module<D> {
    fn drop(&mut self) {
        if self.drv.make_current().is_ok() {
            // SAFETY: the device is current; unloaded once; every Kernel holds an Arc to this
            // module, so none is left to launch.
            if let Err(e) = unsafe { self.drv.module_unload(self.raw) } {
                tracing::warn!(error = %e, file = %self.file, vendor = D::VENDOR, "module unload failed");
            }
        }
    }
}

/// An entry point of a loaded module.
#[derive(Debug)]
pub struct Kernel<D: Driver> {
    module: Arc<Module<D>>,
    raw: D::RawFunction,
    name: String,
}

// Not derived: a derive would ask `D: Clone`, and only the handle and the `Arc` are cloned.
impl<D: Driver> Clone for Kernel<D> {
    fn clone(&self) -> Self {
        Self {
            module: Arc::clone(&self.module),
            raw: self.raw,
            name: self.name.clone(),
        }
    }
}

// SAFETY: function handles are immutable runtime objects, valid while their module is loaded
// (kept by `self.module`) and usable from any thread (the `Driver` contract; launches make the
// device current first).
unsafe impl<D: Driver> Send for Kernel<D> {}
// SAFETY: see Send.
unsafe impl<D: Driver> Sync for Kernel<D> {}

impl<D: Driver> Kernel<D> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues the kernel on `stream`. A refused launch is [`BackendError::Launch`] naming the
    /// kernel.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number and type, and every pointer must
    /// address device memory large enough for what the kernel reads and writes with these
    /// arguments, alive until the launch completed.
    pub unsafe fn launch(
        &self,
        stream: &Stream<D>,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: the caller's contract is this one's.
        unsafe { self.queue(stream, shape, args, false) }
    }

    /// [`launch`](Self::launch), allowed to start while the stream's previous kernel finishes
    /// (`Driver::launch_early`).
    ///
    /// # Safety
    /// As [`launch`](Self::launch), and the kernel calls `rf_grid_wait()` before it touches
    /// anything the previous kernel reads or writes.
    pub unsafe fn launch_early(
        &self,
        stream: &Stream<D>,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: the caller's contract is this one's.
        unsafe { self.queue(stream, shape, args, true) }
    }

    /// # Safety
    /// As [`launch`](Self::launch); with `early`, as [`launch_early`](Self::launch_early).
    unsafe fn queue(
        &self,
        stream: &Stream<D>,
        shape: LaunchShape,
        args: &[Arg],
        early: bool,
    ) -> BackendResult<()> {
        let drv = &self.module.drv;
        drv.make_current()?;
        let (f, s) = (self.raw, stream.raw());
        // SAFETY: the device is current (above); `raw` belongs to a loaded module (kept alive
        // by `self.module`), `stream` is alive (borrowed); the argument contract (and the
        // early start's) is the caller's.
        let r = unsafe {
            if early {
                drv.launch_early(f, shape, s, args)
            } else {
                drv.launch(f, shape, s, args)
            }
        };
        r.map_err(|reason| BackendError::Launch {
            kernel: self.name.clone(),
            reason,
        })
    }
}

impl<D: Driver> DeviceKernel for Kernel<D> {
    type Stream = Stream<D>;
    unsafe fn launch(
        &self,
        stream: &Stream<D>,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: the caller upholds the argument contract, which is the same as this one's.
        unsafe { Kernel::launch(self, stream, shape, args) }
    }

    unsafe fn launch_early(
        &self,
        stream: &Stream<D>,
        shape: LaunchShape,
        args: &[Arg],
    ) -> BackendResult<()> {
        // SAFETY: as above.
        unsafe { Kernel::launch_early(self, stream, shape, args) }
    }
}
