//! Device memory, pinned host memory and the pinned upload ring as RAII values, plus the
//! per-layer arena. Mirrors `cuda/memory.rs` (same names, same contracts) so the runtime code
//! written against one reads the same against the other. `Pod` is shared with the CUDA side.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use hip_runtime_sys as sys;

use super::device::{bind, check, err_text};
use super::stream::{Event, Stream};
use crate::backend::cuda::Pod;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{DeviceBuffer, DeviceEvent, DeviceStream};

fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding), so its memory is initialised bytes; the length is exact.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod (every bit pattern valid), so writing arbitrary bytes keeps it valid.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// (free, total) bytes of device `ordinal`.
pub(crate) fn mem_info(ordinal: c_int) -> BackendResult<(usize, usize)> {
    bind(ordinal)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers; the device is current.
    check("hipMemGetInfo", unsafe {
        sys::hipMemGetInfo(&mut free, &mut total)
    })?;
    Ok((free, total))
}

/// One device allocation (`hipMalloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceBuf {
    ordinal: c_int,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuf {
    /// Allocates `bytes` (uninitialised). Out of memory is [`BackendError::OutOfMemory`]: nothing
    /// was allocated and the device stays usable.
    pub(crate) fn alloc(ordinal: c_int, bytes: usize, what: &str) -> BackendResult<Self> {
        if bytes == 0 {
            return Ok(Self {
                ordinal,
                ptr: 0,
                bytes: 0,
            });
        }
        bind(ordinal)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the memory is only handed out as raw device bytes.
        match unsafe { sys::hipMalloc(&mut p, bytes) } {
            sys::hipError_t::hipSuccess => Ok(Self {
                ordinal,
                ptr: p as u64,
                bytes,
            }),
            sys::hipError_t::hipErrorOutOfMemory => {
                let free = mem_info(ordinal).map(|(f, _)| f).unwrap_or(0);
                Err(BackendError::OutOfMemory {
                    requested: bytes,
                    free,
                    what: what.to_string(),
                })
            }
            e => Err(BackendError::Driver {
                backend: "HIP",
                op: "hipMalloc",
                reason: err_text(e),
            }),
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

    fn addr(&self, offset: usize) -> *mut c_void {
        (self.ptr + offset as u64) as *mut c_void
    }

    /// Copies `src` to byte `offset` (synchronous; for setup and tests, not the upload path).
    pub fn write<T: Pod>(&self, offset: usize, src: &[T]) -> BackendResult<()> {
        let b = as_bytes(src);
        self.check_range("DeviceBuf::write", offset, b.len())?;
        if b.is_empty() {
            return Ok(());
        }
        bind(self.ordinal)?;
        // SAFETY: the range was checked against this live allocation; `b` is valid for reads
        // (the binding takes `*mut` but hipMemcpyHtoD only reads the source).
        check("hipMemcpyHtoD", unsafe {
            sys::hipMemcpyHtoD(self.addr(offset), b.as_ptr() as *mut c_void, b.len())
        })
    }

    /// Copies from byte `offset` into `dst` (synchronous).
    pub fn read<T: Pod>(&self, offset: usize, dst: &mut [T]) -> BackendResult<()> {
        let b = as_bytes_mut(dst);
        self.check_range("DeviceBuf::read", offset, b.len())?;
        if b.is_empty() {
            return Ok(());
        }
        bind(self.ordinal)?;
        // SAFETY: the range was checked; `b` is valid for writes of its length.
        check("hipMemcpyDtoH", unsafe {
            sys::hipMemcpyDtoH(b.as_mut_ptr().cast(), self.addr(offset), b.len())
        })
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
        bind(self.ordinal)?;
        // SAFETY: the whole live allocation is written.
        check("hipMemsetD8", unsafe {
            sys::hipMemsetD8(self.addr(0), 0, self.bytes)
        })
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
        if bind(self.ordinal).is_ok() {
            // SAFETY: `ptr` came from hipMalloc and is freed once. Work that may still use it
            // must have been synchronised by the owner (streams hold no references to buffers).
            let e = unsafe { sys::hipFree(self.ptr as *mut c_void) };
            if let Err(e) = check("hipFree", e) {
                tracing::warn!(error = %e, bytes = self.bytes, "hipFree failed");
            }
        }
    }
}

/// Page-locked host memory (`hipHostMalloc`): the source from which host-to-device copies run
/// asynchronously at full PCIe speed. Freed on drop.
#[derive(Debug)]
pub struct PinnedBuf {
    ordinal: c_int,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer exclusively owns its allocation; shared access only hands out `&[u8]`,
// mutation needs `&mut self`. Pinned memory is ordinary host memory to every thread.
unsafe impl Send for PinnedBuf {}
// SAFETY: see Send.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub(crate) fn alloc(ordinal: c_int, bytes: usize) -> BackendResult<Self> {
        bind(ordinal)?;
        let n = bytes.max(1);
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; hipHostMallocDefault = plain pinned memory, zeroed below
        // before any read.
        let e = unsafe { sys::hipHostMalloc(&mut p, n, sys::hipHostMallocDefault) };
        if e != sys::hipError_t::hipSuccess || p.is_null() {
            return Err(BackendError::PinnedAlloc {
                requested: bytes,
                reason: err_text(e),
            });
        }
        // SAFETY: `p` points to `n` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, n) };
        Ok(Self {
            ordinal,
            ptr: p.cast(),
            bytes,
        })
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
        if bind(self.ordinal).is_ok() {
            // SAFETY: `ptr` came from hipHostMalloc and is freed once; copies reading it must
            // have completed (PinnedRing hands a slot out again only after its event).
            let e = unsafe { sys::hipHostFree(self.ptr.cast()) };
            if let Err(e) = check("hipHostFree", e) {
                tracing::warn!(error = %e, "hipHostFree failed");
            }
        }
    }
}

/// A ring of pinned slots for the upload path: a slot is filled on the host, its copy queued on
/// a stream, an event recorded behind the copy; the slot is handed out again only once that
/// event completed, so the host never overwrites bytes a copy is still reading.
#[derive(Debug)]
pub struct PinnedRing {
    slots: Vec<(PinnedBuf, Event, bool)>,
    next: usize,
}

impl PinnedRing {
    pub(crate) fn new(ordinal: c_int, slots: usize, slot_bytes: usize) -> BackendResult<Self> {
        if slots == 0 {
            return Err(BackendError::InvalidArgument {
                op: "PinnedRing::new",
                what: "zero slots".into(),
            });
        }
        let mut v = Vec::with_capacity(slots);
        for _ in 0..slots {
            v.push((
                PinnedBuf::alloc(ordinal, slot_bytes)?,
                Event::new(ordinal, false)?,
                false,
            ));
        }
        Ok(Self { slots: v, next: 0 })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slots.first().map_or(0, |s| s.0.len())
    }

    /// The next slot in ring order, after waiting (host side) for the copy that last read it.
    pub fn acquire(&mut self) -> BackendResult<(usize, &mut PinnedBuf)> {
        let i = self.next;
        self.next = (self.next + 1) % self.slots.len();
        let slot = &mut self.slots[i];
        if slot.2 {
            slot.1.synchronize()?;
            slot.2 = false;
        }
        Ok((i, &mut slot.0))
    }

    /// Copies `len` bytes of slot `i` to `dst` at `dst_off` on `stream` and records the slot's
    /// event behind the copy. Returns that event so the compute stream can wait on it.
    pub fn upload(
        &mut self,
        i: usize,
        stream: &Stream,
        dst: &impl DeviceBuffer,
        dst_off: usize,
        len: usize,
    ) -> BackendResult<&Event> {
        let n = self.slots.len();
        let slot = self
            .slots
            .get_mut(i)
            .ok_or_else(|| BackendError::InvalidArgument {
                op: "PinnedRing::upload",
                what: format!("slot {i} of {n}"),
            })?;
        // SAFETY: the slot's buffer lives in the ring, which outlives the copy: it is handed out
        // again (acquire) or freed (drop synchronises) only after the event recorded below.
        unsafe { stream.copy_htod_async(dst, dst_off, &slot.0, 0, len)? };
        stream.record(&slot.1)?;
        slot.2 = true;
        Ok(&slot.1)
    }
}

impl Drop for PinnedRing {
    fn drop(&mut self) {
        // A copy may still read a slot: wait before the buffers are freed.
        for (_, ev, busy) in &self.slots {
            if *busy {
                if let Err(e) = ev.synchronize() {
                    tracing::warn!(error = %e, "PinnedRing: waiting for a copy failed");
                }
            }
        }
    }
}

/// Alignment of every arena sub-allocation: enough for vector loads and BLAS operands.
pub const ARENA_ALIGN: usize = 256;

/// One device allocation for one layer (or one workspace), carved into tensors front to back.
/// Slices keep the allocation alive, so dropping the arena while a slice is in use is safe.
#[derive(Debug)]
pub struct DeviceArena {
    buf: Arc<DeviceBuf>,
    used: usize,
}

impl DeviceArena {
    pub(crate) fn new(ordinal: c_int, bytes: usize, what: &str) -> BackendResult<Self> {
        Ok(Self {
            buf: Arc::new(DeviceBuf::alloc(ordinal, bytes, what)?),
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
