//! Streams and events as RAII values (mirrors `cuda/stream.rs`).

use std::ffi::{c_int, c_void};

use hip_runtime_sys as sys;

use super::device::{bind, check};
use super::memory::PinnedBuf;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{DeviceBuffer, DeviceEvent, DeviceStream};

/// A non-blocking stream (no implicit sync with the null stream), destroyed on drop.
#[derive(Debug)]
pub struct Stream {
    ordinal: c_int,
    raw: sys::hipStream_t,
}

// SAFETY: HIP stream handles are runtime objects usable from any host thread; the runtime
// serialises concurrent submissions to one stream.
unsafe impl Send for Stream {}
// SAFETY: see Send.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ordinal: c_int) -> BackendResult<Self> {
        bind(ordinal)?;
        let mut raw: sys::hipStream_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the stream belongs to the current device.
        check("hipStreamCreateWithFlags", unsafe {
            sys::hipStreamCreateWithFlags(&mut raw, sys::hipStreamNonBlocking)
        })?;
        Ok(Self { ordinal, raw })
    }

    pub(crate) fn raw(&self) -> sys::hipStream_t {
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
        if len == 0 {
            return Ok(());
        }
        bind(self.ordinal)?;
        // SAFETY: ranges checked above; liveness is the caller's contract. The binding takes
        // `*mut` for the source, which the copy only reads.
        check("hipMemcpyHtoDAsync", unsafe {
            sys::hipMemcpyHtoDAsync(
                (dst.device_ptr() + dst_off as u64) as *mut c_void,
                src.host_ptr().add(src_off) as *mut c_void,
                len,
                self.raw,
            )
        })
    }
}

impl DeviceStream for Stream {
    type Event = Event;

    fn record(&self, event: &Event) -> BackendResult<()> {
        // SAFETY: both handles are alive (owned by `self` and `event`).
        check("hipEventRecord", unsafe {
            sys::hipEventRecord(event.raw, self.raw)
        })
    }

    fn wait(&self, event: &Event) -> BackendResult<()> {
        // SAFETY: both handles are alive; flags must be 0.
        check("hipStreamWaitEvent", unsafe {
            sys::hipStreamWaitEvent(self.raw, event.raw, 0)
        })
    }

    fn synchronize(&self) -> BackendResult<()> {
        // SAFETY: the stream is alive.
        check("hipStreamSynchronize", unsafe {
            sys::hipStreamSynchronize(self.raw)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: destroyed once; queued work still completes (hipStreamDestroy semantics).
        if let Err(e) = check("hipStreamDestroy", unsafe {
            sys::hipStreamDestroy(self.raw)
        }) {
            tracing::warn!(error = %e, "hipStreamDestroy failed");
        }
    }
}

/// An event, destroyed on drop.
#[derive(Debug)]
pub struct Event {
    raw: sys::hipEvent_t,
    timing: bool,
}

// SAFETY: event handles are runtime objects usable from any host thread.
unsafe impl Send for Event {}
// SAFETY: see Send.
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn new(ordinal: c_int, timing: bool) -> BackendResult<Self> {
        bind(ordinal)?;
        let flags = if timing {
            sys::hipEventDefault
        } else {
            sys::hipEventDisableTiming
        };
        let mut raw: sys::hipEvent_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the event belongs to the current device.
        check("hipEventCreateWithFlags", unsafe {
            sys::hipEventCreateWithFlags(&mut raw, flags)
        })?;
        Ok(Self { raw, timing })
    }
}

impl DeviceEvent for Event {
    fn synchronize(&self) -> BackendResult<()> {
        // SAFETY: the event is alive.
        check("hipEventSynchronize", unsafe {
            sys::hipEventSynchronize(self.raw)
        })
    }

    fn is_complete(&self) -> BackendResult<bool> {
        // SAFETY: the event is alive.
        match unsafe { sys::hipEventQuery(self.raw) } {
            sys::hipError_t::hipSuccess => Ok(true),
            sys::hipError_t::hipErrorNotReady => Ok(false),
            e => check("hipEventQuery", e).map(|_| false),
        }
    }

    fn elapsed_ms(&self, end: &Self) -> BackendResult<f32> {
        if !self.timing || !end.timing {
            return Err(BackendError::InvalidArgument {
                op: "Event::elapsed_ms",
                what: "both events must be created with timing enabled".into(),
            });
        }
        let mut ms = 0f32;
        // SAFETY: both events are alive and were created with timing; valid out-pointer.
        check("hipEventElapsedTime", unsafe {
            sys::hipEventElapsedTime(&mut ms, self.raw, end.raw)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroyed once.
        if let Err(e) = check("hipEventDestroy", unsafe { sys::hipEventDestroy(self.raw) }) {
            tracing::warn!(error = %e, "hipEventDestroy failed");
        }
    }
}
