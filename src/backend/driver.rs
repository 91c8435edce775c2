//! The memory, stream and event layer of every GPU vendor, written once over [`Driver`]: the
//! few raw runtime calls a vendor supplies (CUDA's driver API through `cudarc`, HIP's runtime
//! through `hip-runtime-sys`). Everything above the calls — range checks, out-of-memory errors,
//! RAII frees, the `DeviceBuffer` / `BufferIo` / `PinnedHost` / `DeviceStream` / `DeviceEvent`
//! contracts — lives here, so the two vendors cannot drift apart. Modules and launches, over
//! the same trait, are in `backend::module`.
//!
//! Layering (CONVENTIONS.md): raw FFI → the vendor's [`Driver`] impl (one `Result` per call,
//! the device made current first) → [`DeviceBuf`], [`PinnedBuf`], [`Stream`], [`Event`]
//! (and `Module`, `Kernel`), whose `Drop` frees.

use std::any::Any;
use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use super::buffer::{check_range, BufferIo, DeviceBuffer, Pod};
use super::error::{BackendError, BackendResult};
use super::gpu::{Arg, LaunchShape};
use super::{DeviceEvent, DeviceStream, PinnedHost};

/// A pinned allocation that failed: why, in the vendor's words.
pub type HostAllocError = String;

/// One vendor's runtime calls on one device. Every memory, stream and event call makes the
/// device current on the calling thread first (CUDA: binds the context; HIP: `hipSetDevice`),
/// so the values built on it may be used from any thread. The module and launch calls are the
/// bare runtime calls: their caller ([`Module`](super::module::Module)) calls
/// [`make_current`](Driver::make_current) first, so a failure to bind is reported as such and
/// a refused call in the runtime's own words.
///
/// # Safety
/// Implementations must be the vendor's real calls with the documented semantics: `malloc`
/// returns a fresh device allocation of at least `bytes`, `host_alloc` page-locked host memory
/// of at least `bytes`, the copies copy exactly the ranges given, the stream and event handles
/// they return stay valid until destroyed, module handles until unloaded and function handles
/// while their module is loaded, and every handle may be used from any thread with the device
/// current. The types in this module and `backend::module` rely on it for their
/// `DeviceBuffer` and `Send`/`Sync` promises.
pub unsafe trait Driver: fmt::Debug + Send + Sync + 'static {
    /// `"CUDA"` or `"HIP"`, for messages.
    const VENDOR: &'static str;
    /// A stream handle (a raw pointer: the wrappers below own it).
    type RawStream: Copy + fmt::Debug;
    type RawEvent: Copy + fmt::Debug;
    /// A loaded code object.
    type RawModule: Copy + fmt::Debug;
    /// An entry point of a loaded code object.
    type RawFunction: Copy + fmt::Debug;

    /// (free, total) device memory in bytes.
    fn mem_info(&self) -> BackendResult<(usize, usize)>;
    /// A device allocation of `bytes > 0`; `Ok(None)` when the device is out of memory (nothing
    /// allocated, the device stays usable).
    fn malloc(&self, bytes: usize) -> BackendResult<Option<u64>>;
    /// # Safety
    /// `ptr` came from `malloc` and is freed once, with no queued work still using it.
    unsafe fn free(&self, ptr: u64) -> BackendResult<()>;
    /// # Safety
    /// `dst..dst + src.len()` is live device memory.
    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> BackendResult<()>;
    /// # Safety
    /// `src..src + dst.len()` is live device memory.
    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> BackendResult<()>;
    /// # Safety
    /// `dst..dst + bytes` is live device memory.
    unsafe fn memset_zero(&self, dst: u64, bytes: usize) -> BackendResult<()>;
    /// Page-locked host memory of `bytes > 0` (contents unspecified).
    fn host_alloc(&self, bytes: usize) -> Result<*mut u8, HostAllocError>;
    /// # Safety
    /// `ptr` came from `host_alloc` and is freed once, with no copy still reading it.
    unsafe fn host_free(&self, ptr: *mut u8) -> BackendResult<()>;

    /// A stream that does not synchronize with the legacy default stream.
    fn stream_create(&self) -> BackendResult<Self::RawStream>;
    /// # Safety
    /// `s` is live and destroyed once (queued work still completes).
    unsafe fn stream_destroy(&self, s: Self::RawStream) -> BackendResult<()>;
    /// # Safety
    /// `s` is live.
    unsafe fn stream_synchronize(&self, s: Self::RawStream) -> BackendResult<()>;
    /// # Safety
    /// `s` and `e` are live.
    unsafe fn stream_wait(&self, s: Self::RawStream, e: Self::RawEvent) -> BackendResult<()>;
    /// Queues a copy of `len` bytes from pinned `src` to device `dst` on `s`.
    ///
    /// # Safety
    /// Both ranges are live until the copy completed, `s` is live.
    unsafe fn copy_htod_async(
        &self,
        dst: u64,
        src: *const u8,
        len: usize,
        s: Self::RawStream,
    ) -> BackendResult<()>;

    /// An event; `timing`: `elapsed_ms` works. Events without timing may be waited on by
    /// sleeping rather than spinning (CUDA: `BLOCKING_SYNC`).
    fn event_create(&self, timing: bool) -> BackendResult<Self::RawEvent>;
    /// # Safety
    /// `e` is live and destroyed once.
    unsafe fn event_destroy(&self, e: Self::RawEvent) -> BackendResult<()>;
    /// # Safety
    /// `e` and `s` are live.
    unsafe fn event_record(&self, e: Self::RawEvent, s: Self::RawStream) -> BackendResult<()>;
    /// # Safety
    /// `e` is live.
    unsafe fn event_synchronize(&self, e: Self::RawEvent) -> BackendResult<()>;
    /// Whether the recorded work completed.
    ///
    /// # Safety
    /// `e` is live.
    unsafe fn event_query(&self, e: Self::RawEvent) -> BackendResult<bool>;
    /// # Safety
    /// Both events are live and were created with timing.
    unsafe fn event_elapsed_ms(
        &self,
        start: Self::RawEvent,
        end: Self::RawEvent,
    ) -> BackendResult<f32>;

    /// Makes the device current on the calling thread (needed before the calls below).
    fn make_current(&self) -> BackendResult<()>;
    /// Loads a compiled image; `Err` is the runtime's reason.
    ///
    /// # Safety
    /// The device is current; `image` is a complete image of the vendor's kind (CUDA: a cubin,
    /// or PTX text ending in NUL; HIP: an AMD code object): the loaders take no length.
    unsafe fn module_load(&self, image: &[u8]) -> Result<Self::RawModule, String>;
    /// # Safety
    /// The device is current; `m` came from `module_load` and is unloaded once, with no
    /// function of it launched afterwards.
    unsafe fn module_unload(&self, m: Self::RawModule) -> Result<(), String>;
    /// Entry point `name` of `m`, `None` when it has none.
    ///
    /// # Safety
    /// The device is current; `m` is loaded.
    unsafe fn module_function(&self, m: Self::RawModule, name: &CStr) -> Option<Self::RawFunction>;
    /// Queues `f` on `s` with `args` (each vendor passes them in the form its runtime takes);
    /// `Err` is the runtime's reason.
    ///
    /// # Safety
    /// The device is current; `f`'s module is loaded and `s` is live; `args` match `f`'s
    /// parameter list in number and type, and every pointer addresses device memory large
    /// enough for what the kernel reads and writes, alive until the launch completed.
    unsafe fn launch(
        &self,
        f: Self::RawFunction,
        shape: LaunchShape,
        s: Self::RawStream,
        args: &[Arg],
    ) -> Result<(), String>;
    /// Queues `f` as [`launch`](Self::launch) does, allowed to start while the previous kernel
    /// on `s` finishes (CUDA's programmatic dependent launch, sm_90 and later): `f` must call
    /// `rf_grid_wait()` (kernels/vendor.cuh) before it touches anything that kernel reads or
    /// writes. Default, and where the device has no such launch: an ordinary one.
    ///
    /// # Safety
    /// As [`launch`](Self::launch), and `f` waits as just said.
    unsafe fn launch_early(
        &self,
        f: Self::RawFunction,
        shape: LaunchShape,
        s: Self::RawStream,
        args: &[Arg],
    ) -> Result<(), String> {
        // SAFETY: the caller's contract includes `launch`'s.
        unsafe { self.launch(f, shape, s, args) }
    }
}

/// One device allocation, freed on drop.
#[derive(Debug)]
pub struct DeviceBuf<D: Driver> {
    drv: Arc<D>,
    ptr: u64,
    bytes: usize,
}

impl<D: Driver> DeviceBuf<D> {
    /// Allocates `bytes` (uninitialised). Out of memory is [`BackendError::OutOfMemory`]: nothing
    /// was allocated and the device stays usable.
    pub fn alloc(drv: &Arc<D>, bytes: usize, what: &str) -> BackendResult<Self> {
        let ptr = if bytes == 0 {
            0
        } else {
            drv.malloc(bytes)?
                .ok_or_else(|| BackendError::OutOfMemory {
                    requested: bytes,
                    free: drv.mem_info().map(|(f, _)| f).unwrap_or(0),
                    what: what.to_string(),
                })?
        };
        Ok(Self {
            drv: Arc::clone(drv),
            ptr,
            bytes,
        })
    }

    /// Allocates and fills a buffer from host data (synchronous; setup and tests).
    pub fn upload<T: Pod>(drv: &Arc<D>, data: &[T], what: &str) -> BackendResult<Self> {
        let b = Self::alloc(drv, std::mem::size_of_val(data), what)?;
        b.write(0, data)?;
        Ok(b)
    }
}

// SAFETY: `ptr..ptr + bytes` is this value's own allocation (`Driver::malloc`), freed only in
// `Drop`, so it is live for every borrow.
unsafe impl<D: Driver> DeviceBuffer for DeviceBuf<D> {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl<D: Driver> BufferIo for DeviceBuf<D> {
    fn write<T: Pod>(&self, offset: usize, src: &[T]) -> BackendResult<()> {
        let b: &[u8] = bytemuck::cast_slice(src);
        check_range("DeviceBuf::write", offset, b.len(), self.bytes)?;
        if b.is_empty() {
            return Ok(());
        }
        // SAFETY: the range was checked against this live allocation.
        unsafe { self.drv.copy_htod(self.ptr + offset as u64, b) }
    }

    fn read<T: Pod>(&self, offset: usize, dst: &mut [T]) -> BackendResult<()> {
        let b: &mut [u8] = bytemuck::cast_slice_mut(dst);
        check_range("DeviceBuf::read", offset, b.len(), self.bytes)?;
        if b.is_empty() {
            return Ok(());
        }
        // SAFETY: the range was checked against this live allocation.
        unsafe { self.drv.copy_dtoh(b, self.ptr + offset as u64) }
    }

    fn zero(&self) -> BackendResult<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        // SAFETY: the whole live allocation is written.
        unsafe { self.drv.memset_zero(self.ptr, self.bytes) }
    }
}

impl<D: Driver> Drop for DeviceBuf<D> {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        // SAFETY: `ptr` came from `malloc` and is freed once. Work still using it must have been
        // ordered before this by the owner (the pipeline waits on a region's fence first).
        if let Err(e) = unsafe { self.drv.free(self.ptr) } {
            tracing::warn!(error = %e, bytes = self.bytes, "freeing device memory failed");
        }
    }
}

/// Page-locked host memory: the only source from which host-to-device copies run
/// asynchronously and at full PCIe speed. Either its own allocation (freed on drop) or one
/// slice of a larger page-locked region shared with the other slices of a ring (the region,
/// kept alive by every slice, is released when the last slice drops).
pub struct PinnedBuf<D: Driver> {
    drv: Arc<D>,
    ptr: *mut u8,
    bytes: usize,
    /// `Some` for a slice of a shared region: the region outlives every slice.
    region: Option<Arc<dyn Any + Send + Sync>>,
}

impl<D: Driver> fmt::Debug for PinnedBuf<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBuf")
            .field("ptr", &self.ptr)
            .field("bytes", &self.bytes)
            .field("shared_region", &self.region.is_some())
            .finish()
    }
}

// SAFETY: the buffer exclusively owns its allocation (or, for a ring slice, its range of the
// shared region: slices never overlap); shared access only hands out `&[u8]`, mutation needs
// `&mut self`. Pinned memory is ordinary host memory to every thread.
unsafe impl<D: Driver> Send for PinnedBuf<D> {}
// SAFETY: see Send.
unsafe impl<D: Driver> Sync for PinnedBuf<D> {}

impl<D: Driver> PinnedBuf<D> {
    /// `bytes` of zeroed pinned memory.
    pub fn alloc(drv: &Arc<D>, bytes: usize) -> BackendResult<Self> {
        let n = bytes.max(1);
        let ptr = drv
            .host_alloc(n)
            .map_err(|reason| BackendError::PinnedAlloc {
                requested: bytes,
                reason,
            })?;
        // SAFETY: `ptr` points to `n` writable bytes just allocated, not yet shared (Rust may
        // not assume the contents of freshly pinned pages, so they are written before any read).
        unsafe { std::ptr::write_bytes(ptr, 0, n) };
        Ok(Self {
            drv: Arc::clone(drv),
            ptr,
            bytes,
            region: None,
        })
    }

    /// `bytes` at `ptr` inside a page-locked `region` that this slice keeps alive.
    ///
    /// # Safety
    /// `ptr..ptr + bytes` lies inside memory owned by `region`, initialised, page-locked for
    /// `drv`'s device for as long as `region` lives, and no other slice overlaps it.
    pub unsafe fn slice_of(
        drv: &Arc<D>,
        region: Arc<dyn Any + Send + Sync>,
        ptr: *mut u8,
        bytes: usize,
    ) -> Self {
        Self {
            drv: Arc::clone(drv),
            ptr,
            bytes,
            region: Some(region),
        }
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
}

impl<D: Driver> PinnedHost for PinnedBuf<D> {
    fn host_bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn host_bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl<D: Driver> Drop for PinnedBuf<D> {
    fn drop(&mut self) {
        if self.region.is_some() {
            // A slice of a shared region: the last slice's `Arc` releases it.
            return;
        }
        // SAFETY: `ptr` came from `host_alloc` and is freed once; copies reading it must have
        // completed (the uploader recycles a slot only after its event).
        if let Err(e) = unsafe { self.drv.host_free(self.ptr) } {
            tracing::warn!(error = %e, "freeing pinned memory failed");
        }
    }
}

/// A non-blocking stream, destroyed on drop.
#[derive(Debug)]
pub struct Stream<D: Driver> {
    drv: Arc<D>,
    raw: D::RawStream,
}

// SAFETY: stream handles may be used from any thread (every driver call makes the device
// current first); the runtime serialises concurrent calls on one stream.
unsafe impl<D: Driver> Send for Stream<D> {}
// SAFETY: see Send.
unsafe impl<D: Driver> Sync for Stream<D> {}

impl<D: Driver> Stream<D> {
    pub fn new(drv: &Arc<D>) -> BackendResult<Self> {
        Ok(Self {
            raw: drv.stream_create()?,
            drv: Arc::clone(drv),
        })
    }

    /// The handle, for launches and libraries that queue work on this stream.
    pub fn raw(&self) -> D::RawStream {
        self.raw
    }

    /// Queues a host-to-device copy of `src[src_off..src_off + len]` to `dst` at `dst_off`.
    /// Ranges are checked (an error, nothing queued).
    ///
    /// # Safety
    /// `src` and `dst` must stay alive and `src` unmodified until the copy completed (record
    /// an event after this call and wait for it before reusing the slot).
    pub unsafe fn copy_htod_async(
        &self,
        dst: &impl DeviceBuffer,
        dst_off: usize,
        src: &PinnedBuf<D>,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()> {
        check_range(
            "copy_htod_async (device side)",
            dst_off,
            len,
            dst.len_bytes(),
        )?;
        check_range("copy_htod_async (pinned side)", src_off, len, src.len())?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: ranges checked above (`src_off + len <= src.len()`, so the pointer stays in
        // the allocation); liveness is the caller's contract.
        unsafe {
            self.drv.copy_htod_async(
                dst.device_ptr() + dst_off as u64,
                src.ptr.add(src_off),
                len,
                self.raw,
            )
        }
    }
}

impl<D: Driver> DeviceStream for Stream<D> {
    type Event = Event<D>;

    fn record(&self, event: &Event<D>) -> BackendResult<()> {
        // SAFETY: both handles are alive (owned by `self` and `event`).
        unsafe { self.drv.event_record(event.raw, self.raw) }
    }

    fn wait(&self, event: &Event<D>) -> BackendResult<()> {
        // SAFETY: both handles are alive.
        unsafe { self.drv.stream_wait(self.raw, event.raw) }
    }

    fn synchronize(&self) -> BackendResult<()> {
        // SAFETY: the stream is alive.
        unsafe { self.drv.stream_synchronize(self.raw) }
    }
}

impl<D: Driver> Drop for Stream<D> {
    fn drop(&mut self) {
        // SAFETY: destroyed once; queued work still completes.
        if let Err(e) = unsafe { self.drv.stream_destroy(self.raw) } {
            tracing::warn!(error = %e, "destroying a stream failed");
        }
    }
}

/// An event, destroyed on drop.
#[derive(Debug)]
pub struct Event<D: Driver> {
    drv: Arc<D>,
    raw: D::RawEvent,
    timing: bool,
}

// SAFETY: event handles are usable from any thread (every driver call makes the device current).
unsafe impl<D: Driver> Send for Event<D> {}
// SAFETY: see Send.
unsafe impl<D: Driver> Sync for Event<D> {}

impl<D: Driver> Event<D> {
    pub fn new(drv: &Arc<D>, timing: bool) -> BackendResult<Self> {
        Ok(Self {
            raw: drv.event_create(timing)?,
            drv: Arc::clone(drv),
            timing,
        })
    }
}

impl<D: Driver> DeviceEvent for Event<D> {
    fn synchronize(&self) -> BackendResult<()> {
        // SAFETY: the event is alive.
        unsafe { self.drv.event_synchronize(self.raw) }
    }

    fn is_complete(&self) -> BackendResult<bool> {
        // SAFETY: the event is alive.
        unsafe { self.drv.event_query(self.raw) }
    }

    fn elapsed_ms(&self, end: &Self) -> BackendResult<f32> {
        if !self.timing || !end.timing {
            return Err(BackendError::InvalidArgument {
                op: "Event::elapsed_ms",
                what: "both events must be created with timing enabled".into(),
            });
        }
        // SAFETY: both events are alive and were created with timing.
        unsafe { self.drv.event_elapsed_ms(self.raw, end.raw) }
    }
}

impl<D: Driver> Drop for Event<D> {
    fn drop(&mut self) {
        // SAFETY: destroyed once.
        if let Err(e) = unsafe { self.drv.event_destroy(self.raw) } {
            tracing::warn!(error = %e, "destroying an event failed");
        }
    }
}
