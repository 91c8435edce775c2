//! Device memory as the launchers see it, for every vendor: [`Pod`] element types, the
//! [`DeviceBuffer`] contract, borrowed sub-range [`View`]s and [`DeviceTensor`]s, and
//! synchronous [`BufferIo`].
//!
//! Soundness: the safe launchers in `gpu::ops` check sizes against `len_bytes()` and then pass
//! `device_ptr()` to a kernel, so they are only as safe as those two numbers are true. Hence
//! [`DeviceBuffer`] is an `unsafe trait` (implementing it is a promise about the memory) and a
//! [`View`] has private fields and borrows the buffer it came from: safe code can neither make up
//! an address nor keep a view past its buffer's life (cudarc's `CudaView<'a, T>` is the model).
//!
//! A view is used while its buffer lives (this compiles) ...
//!
//! ```
//! use rocmforge::backend::{DeviceBuffer, View};
//! fn len_of<B: DeviceBuffer>(make: impl Fn() -> B) -> usize {
//!     let v;
//!     let buf = make();
//!     v = View::of(&buf);
//!     v.len()
//! }
//! ```
//!
//! ... but cannot outlive it (the same code with the buffer in an inner scope does not). Stable
//! rustdoc does not check the error codes named here; each snippet was seen to fail with
//! exactly that error and no other.
//!
//! ```compile_fail,E0597
//! use rocmforge::backend::{DeviceBuffer, View};
//! fn len_of<B: DeviceBuffer>(make: impl Fn() -> B) -> usize {
//!     let v;
//!     {
//!         let buf = make();
//!         v = View::of(&buf);
//!     }
//!     v.len()
//! }
//! ```
//!
//! ```compile_fail,E0451
//! // Nor can safe code make a view of an address it chose.
//! let v = rocmforge::backend::View { ptr: 0xdead_0000, len: 4096, _buf: std::marker::PhantomData };
//! ```
//!
//! ```compile_fail,E0200
//! // And a type claims to be device memory only in an `unsafe impl`.
//! struct Fake;
//! impl rocmforge::backend::DeviceBuffer for Fake {
//!     fn device_ptr(&self) -> u64 { 0xdead_0000 }
//!     fn len_bytes(&self) -> usize { 4096 }
//! }
//! ```

use std::marker::PhantomData;

use super::error::{BackendError, BackendResult};
use crate::quant::GgmlType;

/// Plain old data copied to and from device memory byte for byte (`bytemuck`'s contract: no
/// padding, every bit pattern valid, no pointers).
pub use bytemuck::Pod;

/// A region of device memory a kernel can be pointed at.
///
/// # Safety
/// `device_ptr()..device_ptr() + len_bytes()` must be device memory of the implementor's
/// device, readable and writable by kernels, that stays allocated for as long as the value is
/// borrowed; both methods must return the same numbers every time. (Kernels run after their
/// launch returns: an owner frees its memory only in ways ordered after queued work, such as
/// the implicitly synchronizing `cuMemFree` / `hipFree`, or after the fence the pipeline waits
/// on before evicting a region.)
pub unsafe trait DeviceBuffer {
    /// Device address of the first byte.
    fn device_ptr(&self) -> u64;
    fn len_bytes(&self) -> usize;
}

/// Bytes `off..off + len` of a device buffer, borrowed from it (a kernel argument; `'a` is the
/// buffer's borrow, so the view cannot outlive it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View<'a> {
    ptr: u64,
    len: usize,
    _buf: PhantomData<&'a ()>,
}

impl<'a> View<'a> {
    /// The whole of `b`.
    pub fn of<B: DeviceBuffer + ?Sized>(b: &'a B) -> Self {
        Self {
            ptr: b.device_ptr(),
            len: b.len_bytes(),
            _buf: PhantomData,
        }
    }

    /// Bytes `off..off + len` of this view; a range outside it is an error.
    pub fn slice(&self, off: usize, len: usize) -> BackendResult<View<'a>> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(BackendError::InvalidArgument {
                op: "view",
                what: format!("{off}+{len} outside {}", self.len),
            });
        }
        Ok(View {
            ptr: self.ptr + off as u64,
            len,
            _buf: PhantomData,
        })
    }

    /// The first `len` bytes; longer than the view is an error.
    pub fn prefix(&self, len: usize) -> BackendResult<View<'a>> {
        self.slice(0, len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: a view is a checked sub-range of a `DeviceBuffer` it borrows for `'a`; that buffer's
// contract covers every byte of it for as long as the view exists.
unsafe impl DeviceBuffer for View<'_> {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
}

/// Bytes `off..off + len` of `b`; a range outside it is an error.
pub fn view<B: DeviceBuffer + ?Sized>(b: &B, off: usize, len: usize) -> BackendResult<View<'_>> {
    View::of(b).slice(off, len)
}

/// One tensor in device memory, as a layer pass reads it (`rows` x `cols` elements of `ty`),
/// borrowed from the region that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTensor<'a> {
    bytes: View<'a>,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> DeviceTensor<'a> {
    /// The tensor in `bytes` (its size against the shape is checked where it is used: the
    /// launchers check every operand).
    pub fn new(bytes: View<'a>, ty: GgmlType, rows: usize, cols: usize) -> Self {
        Self {
            bytes,
            ty,
            rows,
            cols,
        }
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> View<'a> {
        self.bytes
    }
}

// SAFETY: the tensor's bytes are a `View`, whose contract this forwards.
unsafe impl DeviceBuffer for DeviceTensor<'_> {
    fn device_ptr(&self) -> u64 {
        self.bytes.device_ptr()
    }
    fn len_bytes(&self) -> usize {
        self.bytes.len_bytes()
    }
}

/// Synchronous host <-> device I/O on a device buffer (setup, the step's token ids and
/// positions, logits coming back). Not the upload path: that is the pinned ring's.
pub trait BufferIo: DeviceBuffer {
    /// Copies `src` to byte `offset`.
    fn write<T: Pod>(&self, offset: usize, src: &[T]) -> BackendResult<()>;
    /// Copies from byte `offset` into `dst`.
    fn read<T: Pod>(&self, offset: usize, dst: &mut [T]) -> BackendResult<()>;
    /// Sets every byte to zero.
    fn zero(&self) -> BackendResult<()>;
    /// Reads `n` values from the start.
    fn to_vec<T: Pod>(&self, n: usize) -> BackendResult<Vec<T>> {
        let mut v = vec![T::zeroed(); n];
        self.read(0, &mut v)?;
        Ok(v)
    }
}

/// Checks a copy of `len` bytes at `off` against a buffer of `buf_len` bytes (the synchronous
/// and asynchronous copies of every vendor).
pub(crate) fn check_range(
    op: &'static str,
    off: usize,
    len: usize,
    buf_len: usize,
) -> BackendResult<()> {
    if off.checked_add(len).is_none_or(|e| e > buf_len) {
        return Err(BackendError::InvalidArgument {
            op,
            what: format!("{len} bytes at {off} outside a buffer of {buf_len}"),
        });
    }
    Ok(())
}

/// An address range no kernel ever sees, for tests that only check arithmetic and argument
/// packing (never launched, never copied to).
#[cfg(test)]
pub(crate) struct Fake(pub u64, pub usize);

// SAFETY: test-only; never passed to a launch or a copy, only its numbers are read.
#[cfg(test)]
unsafe impl DeviceBuffer for Fake {
    fn device_ptr(&self) -> u64 {
        self.0
    }
    fn len_bytes(&self) -> usize {
        self.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_stay_inside_their_buffer() {
        let b = Fake(1000, 64);
        let v = view(&b, 16, 48).expect("inside");
        assert_eq!((v.device_ptr(), v.len()), (1016, 48));
        let w = v.slice(8, 40).expect("inside the view");
        assert_eq!((w.device_ptr(), w.len()), (1024, 40));
        assert!(v.slice(8, 41).is_err());
        assert!(view(&b, 16, 49).is_err());
        assert!(view(&b, usize::MAX, 2).is_err());
        assert!(View::of(&b).prefix(65).is_err());
    }

    #[test]
    fn copy_ranges_are_checked() {
        assert!(check_range("t", 0, 64, 64).is_ok());
        assert!(check_range("t", 1, 64, 64).is_err());
        assert!(check_range("t", usize::MAX, 1, 64).is_err());
    }
}
