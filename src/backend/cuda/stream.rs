//! Streams and events as RAII values.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, DriverError};

use super::memory::PinnedBuf;
use super::{bind, drv_err};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{DeviceBuffer, DeviceEvent, DeviceStream};

/// A non-blocking stream (no implicit sync with the legacy default stream), destroyed on drop.
#[derive(Debug)]
pub struct Stream {
    ctx: Arc<CudaContext>,
    raw: sys::CUstream,
}

// SAFETY: CUDA stream handles may be used from any thread once the owning context is current
// (every method binds it first).
unsafe impl Send for Stream {}
// SAFETY: see Send; the driver serialises concurrent calls on one stream.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> BackendResult<Self> {
        bind(ctx)?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| drv_err("cuStreamCreate", e))?;
        Ok(Self {
            ctx: Arc::clone(ctx),
            raw,
        })
    }

    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Queues a host-to-device copy of `src[src_off..src_off + len]` to `dst` at `dst_off`.
    ///
    /// # Safety
    /// `src` and `dst` must stay alive and `src` unmodified until the copy completed (record
    /// an event after this call and wait for it before reusing the slot).
    pub unsafe fn copy_htod_async(
        &self,
        dst: &impl DeviceBuffer,
        dst_off: usize,
        src: &PinnedBuf,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()> {
        let ok_dst = dst_off
            .checked_add(len)
            .is_some_and(|e| e <= dst.len_bytes());
        let ok_src = src_off.checked_add(len).is_some_and(|e| e <= src.len());
        if !ok_dst || !ok_src {
            return Err(BackendError::InvalidArgument {
                op: "copy_htod_async",
                what: format!(
                    "{len} bytes from {src_off} (of {}) to {dst_off} (of {})",
                    src.len(),
                    dst.len_bytes()
                ),
            });
        }
        bind(&self.ctx)?;
        // SAFETY: ranges checked above; liveness is the caller's contract.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.device_ptr() + dst_off as u64,
                src.host_ptr().add(src_off).cast(),
                len,
                self.raw,
            )
        }
        .result()
        .map_err(|e| drv_err("cuMemcpyHtoDAsync", e))
    }
}

impl DeviceStream for Stream {
    type Event = Event;

    fn record(&self, event: &Event) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: both handles are alive (owned by `self` and `event`).
        unsafe { result::event::record(event.raw, self.raw) }
            .map_err(|e| drv_err("cuEventRecord", e))
    }

    fn wait(&self, event: &Event) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: both handles are alive.
        unsafe {
            result::stream::wait_event(
                self.raw,
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| drv_err("cuStreamWaitEvent", e))
    }

    fn synchronize(&self) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the stream is alive.
        unsafe { result::stream::synchronize(self.raw) }
            .map_err(|e| drv_err("cuStreamSynchronize", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: destroyed once; queued work still completes (cuStreamDestroy semantics).
            if let Err(e) = unsafe { result::stream::destroy(self.raw) } {
                tracing::warn!(error = %e, "cuStreamDestroy failed");
            }
        }
    }
}

/// An event, destroyed on drop.
#[derive(Debug)]
pub struct Event {
    ctx: Arc<CudaContext>,
    raw: sys::CUevent,
    timing: bool,
}

// SAFETY: event handles are usable from any thread with the context current (bound per call).
unsafe impl Send for Event {}
// SAFETY: see Send.
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn new(ctx: &Arc<CudaContext>, timing: bool) -> BackendResult<Self> {
        bind(ctx)?;
        // Events without timing mark copies and fences; the host waits on them only on threads
        // that recycle staging slots or free memory, so those waits sleep (BLOCKING_SYNC)
        // instead of spinning a core the disk readers need. (Decode waits on its stream, not
        // on an event, and keeps the spinning wait.)
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
                | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
        };
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: the context is current (bound above); `raw` is written by the driver on
        // success and read only then.
        let raw = unsafe {
            sys::cuEventCreate(raw.as_mut_ptr(), flags)
                .result()
                .map_err(|e| drv_err("cuEventCreate", e))?;
            raw.assume_init()
        };
        Ok(Self {
            ctx: Arc::clone(ctx),
            raw,
            timing,
        })
    }
}

impl DeviceEvent for Event {
    fn synchronize(&self) -> BackendResult<()> {
        bind(&self.ctx)?;
        // SAFETY: the event is alive.
        unsafe { result::event::synchronize(self.raw) }
            .map_err(|e| drv_err("cuEventSynchronize", e))
    }

    fn is_complete(&self) -> BackendResult<bool> {
        bind(&self.ctx)?;
        // SAFETY: the event is alive.
        match unsafe { result::event::query(self.raw) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(drv_err("cuEventQuery", e)),
        }
    }

    fn elapsed_ms(&self, end: &Self) -> BackendResult<f32> {
        if !self.timing || !end.timing {
            return Err(BackendError::InvalidArgument {
                op: "Event::elapsed_ms",
                what: "both events must be created with timing enabled".into(),
            });
        }
        bind(&self.ctx)?;
        // SAFETY: both events are alive and were created with timing.
        unsafe { result::event::elapsed(self.raw, end.raw) }
            .map_err(|e| drv_err("cuEventElapsedTime", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: destroyed once.
            if let Err(e) = unsafe { result::event::destroy(self.raw) } {
                tracing::warn!(error = %e, "cuEventDestroy failed");
            }
        }
    }
}
