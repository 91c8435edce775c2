//! Loaded code objects and launches (mirrors `cuda/module.rs`; `Arg` and `LaunchShape` are
//! the vendor-neutral ones of `backend::gpu`).
//!
//! Arguments go through `hipModuleLaunchKernel`'s `extra` buffer (one packed, naturally aligned
//! struct of all parameters), the form the HIP documentation gives for module launches and the
//! one every ROCm release accepts; `kernelParams` was unimplemented in older releases.

use std::ffi::{c_int, c_void, CString};
use std::sync::Arc;

use hip_runtime_sys as sys;

use super::device::{bind, err_text};
use super::driver::Stream;
use crate::backend::error::{BackendError, BackendResult};
pub use crate::backend::gpu::{Arg, LaunchShape};

// HIP_LAUNCH_PARAM_* from hip_runtime_api.h (macros, so absent from the bindings).
const LAUNCH_PARAM_BUFFER_POINTER: usize = 0x01;
const LAUNCH_PARAM_BUFFER_SIZE: usize = 0x02;
const LAUNCH_PARAM_END: usize = 0x03;

/// A code object loaded with `hipModuleLoadData`, unloaded on drop (after every [`Kernel`]).
#[derive(Debug)]
pub struct Module {
    ordinal: c_int,
    raw: sys::hipModule_t,
    file: String,
}

// SAFETY: module handles are runtime objects usable from any thread; hipModuleGetFunction is
// thread-safe.
unsafe impl Send for Module {}
// SAFETY: see Send.
unsafe impl Sync for Module {}

impl Module {
    /// Loads `image` (an AMD code object from hipRTC or `hipcc --genco`).
    pub(crate) fn load(ordinal: c_int, file: &str, image: &[u8]) -> BackendResult<Arc<Self>> {
        bind(ordinal)?;
        let mut raw: sys::hipModule_t = std::ptr::null_mut();
        // SAFETY: `image` is a complete code object alive for the call (the runtime copies what
        // it needs); valid out-pointer.
        let e = unsafe { sys::hipModuleLoadData(&mut raw, image.as_ptr().cast()) };
        if e != sys::hipError_t::hipSuccess {
            return Err(BackendError::Launch {
                kernel: file.to_string(),
                reason: format!("module load: {}", err_text(e)),
            });
        }
        Ok(Arc::new(Self {
            ordinal,
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
        let mut raw: sys::hipFunction_t = std::ptr::null_mut();
        // SAFETY: the module is loaded (owned by self), `c` NUL-terminated, valid out-pointer.
        let e = unsafe { sys::hipModuleGetFunction(&mut raw, self.raw, c.as_ptr()) };
        if e != sys::hipError_t::hipSuccess || raw.is_null() {
            return Err(unknown());
        }
        Ok(Kernel {
            module: Arc::clone(self),
            raw,
            name: name.to_string(),
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if bind(self.ordinal).is_ok() {
            // SAFETY: unloaded once; every Kernel holds an Arc to this module, so none is left.
            let e = unsafe { sys::hipModuleUnload(self.raw) };
            if e != sys::hipError_t::hipSuccess {
                tracing::warn!(error = %err_text(e), file = %self.file, "hipModuleUnload failed");
            }
        }
    }
}

/// The kernel parameters laid out as the device reads them: each at the next multiple of its
/// own alignment (pointers 8, 32-bit scalars 4), as a C struct of those fields would be.
/// Returned in u64 words (so the buffer itself is 8-aligned) with the exact byte length.
pub fn pack_args(args: &[Arg]) -> (Vec<u64>, usize) {
    let mut bytes: Vec<u8> = Vec::with_capacity(args.len() * 8);
    for a in args {
        let (b, align): ([u8; 8], usize) = match *a {
            Arg::Ptr(p) => (p.to_ne_bytes(), 8),
            Arg::I32(v) => (widen(v.to_ne_bytes()), 4),
            Arg::U32(v) => (widen(v.to_ne_bytes()), 4),
            Arg::F32(v) => (widen(v.to_ne_bytes()), 4),
        };
        bytes.resize(bytes.len().div_ceil(align) * align, 0);
        bytes.extend_from_slice(&b[..align]);
    }
    let len = bytes.len();
    let mut words = vec![0u64; len.div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    (words, len)
}

fn widen(b: [u8; 4]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0]
}

/// An entry point of a loaded module.
#[derive(Debug, Clone)]
pub struct Kernel {
    module: Arc<Module>,
    raw: sys::hipFunction_t,
    name: String,
}

// SAFETY: function handles are immutable runtime objects.
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
        let (mut buf, mut len) = pack_args(args);
        let mut extra: [*mut c_void; 5] = [
            LAUNCH_PARAM_BUFFER_POINTER as *mut c_void,
            buf.as_mut_ptr().cast(),
            LAUNCH_PARAM_BUFFER_SIZE as *mut c_void,
            (&mut len as *mut usize).cast(),
            LAUNCH_PARAM_END as *mut c_void,
        ];
        bind(self.module.ordinal)?;
        // SAFETY: `raw` belongs to a loaded module (kept alive by `self.module`); `extra` points
        // at `buf` and `len`, alive for the call (the runtime copies the arguments at launch);
        // the argument contract is the caller's.
        let e = unsafe {
            sys::hipModuleLaunchKernel(
                self.raw,
                shape.grid.0,
                shape.grid.1,
                shape.grid.2,
                shape.block.0,
                shape.block.1,
                shape.block.2,
                shape.shared_bytes,
                stream.raw(),
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        };
        if e == sys::hipError_t::hipSuccess {
            Ok(())
        } else {
            Err(BackendError::Launch {
                kernel: self.name.clone(),
                reason: err_text(e),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64], len: usize) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take(len)
            .collect()
    }

    #[test]
    fn args_are_packed_at_their_natural_alignment() {
        // (ptr, i32, ptr): the second pointer moves to offset 16, like a C struct.
        let (w, len) = pack_args(&[Arg::Ptr(0x1122_3344_5566_7788), Arg::I32(-2), Arg::Ptr(7)]);
        assert_eq!(len, 24);
        let b = bytes(&w, len);
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[8..12], &(-2i32).to_ne_bytes());
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(&b[16..24], &7u64.to_ne_bytes());
        // Consecutive 32-bit scalars stay packed.
        let (w, len) = pack_args(&[Arg::Ptr(1), Arg::U32(3), Arg::F32(1.5), Arg::I32(9)]);
        assert_eq!(len, 20);
        let b = bytes(&w, len);
        assert_eq!(&b[8..12], &3u32.to_ne_bytes());
        assert_eq!(&b[12..16], &1.5f32.to_ne_bytes());
        assert_eq!(&b[16..20], &9i32.to_ne_bytes());
        assert_eq!(pack_args(&[]).1, 0);
    }
}
