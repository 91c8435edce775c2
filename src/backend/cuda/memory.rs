//! Device and pinned host memory as RAII values, and the per-layer arena.
//!
//! Layering (CONVENTIONS.md): `cudarc::driver::sys` (raw) → `cudarc::driver::result` (calls
//! returning `Result`) → these types, whose `Drop` frees. Weights and activations are never
//! allocated one tensor at a time on the hot path: a layer gets one [`DeviceArena`] and its
//! tensors are carved out of it.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, DriverError};

use super::{bind, drv_err};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::DeviceBuffer;

/// Plain old data that may be copied to and from device memory byte for byte.
///
/// # Safety
/// Implementors must have no padding, no invalid bit patterns and no pointers.
pub unsafe trait Pod: Copy + Default + 'static {}
// SAFETY: primitive numbers: every bit pattern valid, no padding.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for i8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for i16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for i32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}
// SAFETY: as above.
unsafe impl Pod for half::f16 {}

fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding), so its memory is initialised bytes; the length is exact.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod (every bit pattern valid), so writing arbitrary bytes keeps it valid.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// One device allocation (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceBuf {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceBuf {
    /// Allocates `bytes` (uninitialised). Out of memory is [`BackendError::OutOfMemory`]: nothing
    /// was allocated and the context stays usable.
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, bytes: usize, what: &str) -> BackendResult<Self> {
        bind(ctx)?;
        if bytes == 0 {
            return Ok(Self {
                ctx: Arc::clone(ctx),
                ptr: 0,
                bytes: 0,
            });
        }
        // SAFETY: the context is current; the memory is only handed out as raw bytes.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Self {
                ctx: Arc::clone(ctx),
                ptr,
                bytes,
            }),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
                Err(BackendError::OutOfMemory {
                    requested: bytes,
                    free,
                    what: what.to_string(),
                })
            }
            Err(e) => Err(drv_err("cuMemAlloc", e)),
        }
    }

    fn check_range(&self, op: &'static str, offset: usize, len: usize) -> BackendResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(BackendError::InvalidArgument {
                op,
                what: format!(
                    "range {offset}+{len} outside a buffer of {} bytes",
                    self.bytes
                ),
            }),
        }
    }

    /// Copies `src` to byte `offset` (synchronous; for setup and tests, not the upload path).
    pub fn write<T: Pod>(&self, offset: usize, src: &[T]) -> BackendResult<()> {
        let b = as_bytes(src);
        self.check_range("DeviceBuf::write", offset, b.len())?;
        if b.is_empty() {
            return Ok(());
        }
        bind(&self.ctx)?;
        // SAFETY: the range was checked against this live allocation; `b` is valid for reads.
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, b) }
            .map_err(|e| drv_err("cuMemcpyHtoD", e))
    }

    /// Copies from byte `offset` into `dst` (synchronous).
    pub fn read<T: Pod>(&self, offset: usize, dst: &mut [T]) -> BackendResult<()> {
        let b = as_bytes_mut(dst);
        self.check_range("DeviceBuf::read", offset, b.len())?;
        if b.is_empty() {
            return Ok(());
        }
        bind(&self.ctx)?;
        // SAFETY: the range was checked; `b` is valid for writes of its length.
        unsafe { result::memcpy_dtoh_sync(b, self.ptr + offset as u64) }
            .map_err(|e| drv_err("cuMemcpyDtoH", e))
    }

    /// Reads `n` values from the start.
    pub fn to_vec<T: Pod>(&self, n: usize) -> BackendResult<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.read(0, &mut v)?;
        Ok(v)
    }

    /// Sets every byte to zero (synchronous).
    pub fn zero(&self) -> BackendResult<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        bind(&self.ctx)?;
        // SAFETY: the whole live allocation is written.
        unsafe { sys::cuMemsetD8_v2(self.ptr, 0, self.bytes) }
            .result()
            .map_err(|e| drv_err("cuMemsetD8", e))
    }
}

impl DeviceBuffer for DeviceBuf {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        if bind(&self.ctx).is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc and is freed once. Work that may still use it
            // must have been synchronised by the owner (streams hold no references to buffers).
            if let Err(e) = unsafe { result::free_sync(self.ptr) } {
                tracing::warn!(error = %e, bytes = self.bytes, "cuMemFree failed");
            }
        }
    }
}

/// Page-locked host memory: the only source from which host-to-device copies run
/// asynchronously and at full PCIe speed. Either its own `cuMemHostAlloc` allocation (freed on
/// drop) or one slice of a registered huge-page region shared with the other slices of a ring
/// (`ComputeDevice::alloc_pinned_ring`; the region is unregistered and unmapped when its last
/// slice drops).
#[derive(Debug)]
pub struct PinnedBuf {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
    /// `Some` for a slice of a shared region: the region outlives every slice.
    region: Option<Arc<super::host::RegisteredHost>>,
}

// SAFETY: the buffer exclusively owns its allocation (or, for a ring slice, its range of the
// shared region: slices never overlap); shared access only hands out `&[u8]`, mutation needs
// `&mut self`. Pinned memory is ordinary host memory to every thread.
unsafe impl Send for PinnedBuf {}
// SAFETY: see Send.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> BackendResult<Self> {
        let me = Self::alloc_unzeroed(ctx, bytes)?;
        // SAFETY: `ptr` points to `bytes.max(1)` writable bytes just allocated, not yet shared.
        unsafe { std::ptr::write_bytes(me.ptr, 0, me.bytes.max(1)) };
        Ok(me)
    }

    /// The allocation without initialising it: only [`PinnedBuf::alloc`], which zeroes it,
    /// calls this (Rust may not assume the contents of freshly pinned pages).
    fn alloc_unzeroed(ctx: &Arc<CudaContext>, bytes: usize) -> BackendResult<Self> {
        bind(ctx)?;
        let n = bytes.max(1);
        // SAFETY: the context is current; flag 0 = plain pinned memory. Readers of the memory
        // (`as_slice`, copies) come after a write: `alloc` zeroes, the ring fills before copying.
        let ptr = unsafe { result::malloc_host(n, 0) }.map_err(|e| BackendError::PinnedAlloc {
            requested: bytes,
            reason: e.to_string(),
        })?;
        Ok(Self {
            ctx: Arc::clone(ctx),
            ptr: ptr.cast(),
            bytes,
            region: None,
        })
    }

    /// `n` buffers of `bytes` each, carved from one huge-page region (`region` when it is large
    /// enough, else one faulted in here) registered once (`cuMemHostRegister`): for a staging ring this replaces `n` calls of
    /// `cuMemHostAlloc` (H100: ~1.4 ms per 4 MiB) by one registration (~2 ms per 64 MiB), and
    /// positional reads into 2 MiB pages run faster than into 4 KiB ones (fewer TLB misses).
    /// Falls back to `n` separate allocations where the registration is refused.
    pub(crate) fn ring(
        ctx: &Arc<CudaContext>,
        n: usize,
        bytes: usize,
        region: Option<super::host::HostRegion>,
    ) -> BackendResult<Vec<Self>> {
        // Slices stay 4 KiB aligned (page-aligned `pread` targets and copy sources).
        let stride = bytes.max(1).div_ceil(4096) * 4096;
        let total = stride.checked_mul(n).ok_or(BackendError::PinnedAlloc {
            requested: usize::MAX,
            reason: format!("{n} slots of {bytes} B overflow"),
        })?;
        let region = match region {
            Some(r) if r.len() >= total => Ok(r),
            _ => super::host::HostRegion::new(total),
        };
        let registered =
            region.and_then(|region| super::host::RegisteredHost::register(ctx, region));
        let region = match registered {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::info!(error = %e, "pinned ring: registration refused, allocating slots");
                return (0..n).map(|_| Self::alloc(ctx, bytes)).collect();
            }
        };
        Ok((0..n)
            .map(|i| Self {
                ctx: Arc::clone(ctx),
                // SAFETY: `i * stride + bytes <= total <= region.len()`: inside the mapping.
                ptr: unsafe { region.ptr().add(i * stride) },
                bytes,
                region: Some(Arc::clone(&region)),
            })
            .collect())
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `bytes` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    pub(crate) fn host_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl crate::backend::PinnedHost for PinnedBuf {
    fn host_bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn host_bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if self.region.is_some() {
            // A slice of a shared region: the last slice's `Arc` unregisters and unmaps it.
            return;
        }
        if bind(&self.ctx).is_ok() {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed once; copies reading it must
            // have completed (the uploader recycles a slot only after its event).
            if let Err(e) = unsafe { result::free_host(self.ptr.cast()) } {
                tracing::warn!(error = %e, "cuMemFreeHost failed");
            }
        }
    }
}

/// Alignment of every arena sub-allocation: enough for vector loads and cuBLAS operands.
pub const ARENA_ALIGN: usize = 256;

/// One device allocation for one layer (or one workspace), carved into tensors front to back.
/// Slices keep the allocation alive, so dropping the arena while a slice is in use is safe.
#[derive(Debug)]
pub struct DeviceArena {
    buf: Arc<DeviceBuf>,
    used: usize,
}

impl DeviceArena {
    pub(crate) fn new(ctx: &Arc<CudaContext>, bytes: usize, what: &str) -> BackendResult<Self> {
        Ok(Self {
            buf: Arc::new(DeviceBuf::alloc(ctx, bytes, what)?),
            used: 0,
        })
    }

    /// Bytes needed for slices of the given sizes, with alignment padding.
    pub fn bytes_for(sizes: &[usize]) -> usize {
        sizes
            .iter()
            .map(|s| s.div_ceil(ARENA_ALIGN) * ARENA_ALIGN)
            .sum()
    }

    pub fn capacity(&self) -> usize {
        self.buf.bytes
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// The next `bytes` of the arena. Running past the end is [`BackendError::OutOfMemory`].
    pub fn carve(&mut self, bytes: usize) -> BackendResult<ArenaSlice> {
        let start = self.used.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        match start.checked_add(bytes) {
            Some(end) if end <= self.buf.bytes => {
                self.used = end;
                Ok(ArenaSlice {
                    buf: Arc::clone(&self.buf),
                    offset: start,
                    bytes,
                })
            }
            _ => Err(BackendError::OutOfMemory {
                requested: bytes,
                free: self.buf.bytes.saturating_sub(start),
                what: format!("arena of {} bytes", self.buf.bytes),
            }),
        }
    }
}

/// A tensor inside a [`DeviceArena`].
#[derive(Debug, Clone)]
pub struct ArenaSlice {
    buf: Arc<DeviceBuf>,
    offset: usize,
    bytes: usize,
}

impl ArenaSlice {
    pub fn write<T: Pod>(&self, src: &[T]) -> BackendResult<()> {
        if std::mem::size_of_val(src) > self.bytes {
            return Err(BackendError::InvalidArgument {
                op: "ArenaSlice::write",
                what: format!(
                    "{} bytes into a slice of {}",
                    std::mem::size_of_val(src),
                    self.bytes
                ),
            });
        }
        self.buf.write(self.offset, src)
    }

    pub fn read<T: Pod>(&self, dst: &mut [T]) -> BackendResult<()> {
        if std::mem::size_of_val(dst) > self.bytes {
            return Err(BackendError::InvalidArgument {
                op: "ArenaSlice::read",
                what: format!(
                    "{} bytes from a slice of {}",
                    std::mem::size_of_val(dst),
                    self.bytes
                ),
            });
        }
        self.buf.read(self.offset, dst)
    }
}

impl DeviceBuffer for ArenaSlice {
    fn device_ptr(&self) -> u64 {
        self.buf.ptr + self.offset as u64
    }
    fn len_bytes(&self) -> usize {
        self.bytes
    }
}
