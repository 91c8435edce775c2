//! The GPU `WeightBackend`, written once over the core crate's vendor-neutral role traits
//! (`ComputeDevice`, `DeviceStream`, `DeviceEvent`, `DeviceBuffer`, `PinnedHost`), so the same
//! code serves CUDA and HIP (issue #7 item 4: no CUDA-only code in the uploader path).
//!
//! - Staging slots are pinned host memory (`alloc_staging`), allocated once with the ring (on
//!   CUDA carved from one registered huge-page region: `ComputeDevice::alloc_pinned_ring`).
//! - Each unit (a layer or the global group) gets one device allocation (`alloc`).
//! - `upload_slot` queues an asynchronous copy from the pinned slot on one of the copy streams,
//!   records an event behind it and hands (event, slot) to that stream's recycler thread, which
//!   returns the slot to its ring only once the event completed. The uploader never waits.
//! - `ready_event` records an event behind a unit's last copy; the GPU compute makes its stream
//!   wait on it on the device (`GpuReady::event`), so the host never blocks on uploads.
//! - Evicting a unit does not free its memory at once: the allocation and its `fence` (recorded
//!   behind the last copy and the last compute that read it) go to a small pool, and the next
//!   unit of the same size (streamed layers all are) takes them; its first copy waits for the
//!   fence *on the device*, so neither the evicting thread nor the uploader blocks, and no
//!   `cuMemFree`/`cuMemAlloc` runs per streamed layer. A unit of another size first frees the
//!   pool (waiting for each fence), so the device never holds more than the budget allowed.

use crate::error::{Result, RuntimeError};
use crate::messages::ReadMode;
use crate::pipeline::backend::{
    ArenaCounters, DeviceRegion, IoGeometry, ReadyEvent, WeightBackend,
};
use crate::pipeline::staging::{SlotMemory, StagingSlot};
use rocmforge::backend::{ComputeDevice, DeviceBuffer, DeviceEvent, DeviceStream, PinnedHost};
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Settings of a [`GpuBackend`].
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Backend name in errors, spans and stats (`"cuda"`, `"hip"`).
    pub name: &'static str,
    /// Copy streams (the issue asks for two or more so copies of different units overlap).
    pub copy_streams: usize,
    /// Device bytes kept free for what is not weights (KV cache, activations, workspace, a
    /// margin): the default weight budget is free memory minus this.
    pub reserve_bytes: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            name: "gpu",
            copy_streams: 2,
            reserve_bytes: 1 << 30,
        }
    }
}

/// A copy waiting for its event before its slot may return to the ring.
type InFlight<D> = (<D as ComputeDevice>::Event, StagingSlot);

/// One copy stream, its spare events and the thread that recycles its slots.
struct Lane<D: ComputeDevice> {
    stream: D::Stream,
    /// Events whose copies completed, ready to be recorded again (one per slot in flight).
    spare: Arc<Mutex<Vec<D::Event>>>,
    /// `None` once the backend is dropping (ends the recycler).
    to_recycler: Option<flume::Sender<InFlight<D>>>,
    recycler: Option<JoinHandle<()>>,
}

/// Device weight memory on a GPU; see the module docs.
pub struct GpuBackend<D: ComputeDevice> {
    dev: Arc<D>,
    cfg: GpuConfig,
    lanes: Vec<Lane<D>>,
    counters: Arc<ArenaCounters>,
    pool: Arc<RegionPool<D>>,
    /// A staging ring made ready ahead of the runtime's build ([`GpuBackend::prepare_staging`]):
    /// `(slots, slot bytes, buffers)`.
    prepared: Mutex<Option<PreparedRing<D>>>,
}

/// A staging ring registered ahead: `(slots, slot bytes, buffers)`.
type PreparedRing<D> = (usize, usize, Vec<<D as ComputeDevice>::Pinned>);

/// The GPU backends' default disk geometry (`WeightBackend::io_geometry`), also what a caller
/// sizes an early staging region by: `pread` with many threads straight into pinned slots (the
/// copy from the page cache is the only host copy, and PCIe needs several threads: one reads
/// the page cache at 3-9 GB/s), two slots per reader (one filling, one copying) and four more.
pub fn default_io_geometry() -> IoGeometry {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    let readers = cores.saturating_sub(4).clamp(2, 12);
    IoGeometry {
        read_mode: ReadMode::Read,
        readers,
        staging_slots: 2 * readers + 4,
        slot_size: 4 << 20,
    }
}

/// Allocations of evicted units, each with its fence, waiting for a unit of the same size.
struct RegionPool<D: ComputeDevice> {
    idle: Mutex<Vec<(D::Buf, D::Event)>>,
}

/// At most this many evicted allocations wait in the pool: the streaming window's worth.
const POOL_CAP: usize = 4;

impl<D: ComputeDevice> RegionPool<D> {
    /// An idle allocation of exactly `bytes`, or `None` after freeing every idle one (waiting
    /// for its fence first), so a fresh allocation never sits beside unused ones.
    fn take_or_trim(&self, bytes: usize) -> Option<(D::Buf, D::Event)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = idle.iter().position(|(b, _)| b.len_bytes() == bytes) {
            return Some(idle.swap_remove(i));
        }
        let freed: Vec<_> = idle.drain(..).collect();
        drop(idle);
        for (buf, fence) in freed {
            free_after::<D>(buf, &fence);
        }
        None
    }
}

impl<D: ComputeDevice> Drop for RegionPool<D> {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for (buf, fence) in idle {
            free_after::<D>(buf, &fence);
        }
    }
}

/// Frees `buf` once the work its fence follows is done.
fn free_after<D: ComputeDevice>(buf: D::Buf, fence: &D::Event) {
    if let Err(e) = fence.synchronize() {
        tracing::warn!(error = %e, "waiting for the last use of a device region");
    }
    drop(buf);
}

/// One unit's weights: a single device allocation.
pub struct GpuRegion<D: ComputeDevice> {
    /// `None` only while dropping.
    buf: Option<D::Buf>,
    /// Recorded behind every copy into and every compute reading this region; waited for
    /// before the memory is freed or reused.
    fence: Option<D::Event>,
    fenced: AtomicBool,
    /// Taken from the pool: the first copy into it must wait (on its stream) for `fence`,
    /// which still follows the previous unit's last use.
    wait_before_write: AtomicBool,
    counters: Arc<ArenaCounters>,
    pool: Arc<RegionPool<D>>,
}

impl<D: ComputeDevice> GpuRegion<D> {
    /// The device allocation (kernels take pointers into it).
    pub fn buffer(&self) -> &D::Buf {
        self.buf
            .as_ref()
            .expect("a region's buffer is present until it drops")
    }

    fn fence(&self) -> &D::Event {
        self.fence
            .as_ref()
            .expect("a region's fence is present until it drops")
    }

    /// A reused allocation: orders `stream` after the previous unit's last use, once.
    fn order_first_write(&self, stream: &D::Stream) -> Result<()> {
        if self.wait_before_write.swap(false, Ordering::AcqRel) {
            stream.wait(self.fence())?;
        }
        Ok(())
    }

    /// Records the region's fence on `stream` after work that reads or writes the region, so
    /// freeing (or reusing) it waits for that work. The GPU compute calls this after each layer.
    pub fn fence_after(&self, stream: &D::Stream) -> Result<()> {
        stream.record(self.fence())?;
        self.fenced.store(true, Ordering::Release);
        Ok(())
    }
}

impl<D: ComputeDevice> Drop for GpuRegion<D> {
    fn drop(&mut self) {
        let (Some(buf), Some(fence)) = (self.buf.take(), self.fence.take()) else {
            return;
        };
        self.counters.sub(buf.len_bytes() as u64);
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        if self.fenced.load(Ordering::Acquire) && idle.len() < POOL_CAP {
            // The next unit of this size waits for the fence on the device (see module docs).
            idle.push((buf, fence));
            return;
        }
        drop(idle);
        if self.fenced.load(Ordering::Acquire) {
            free_after::<D>(buf, &fence);
        }
    }
}

impl<D: ComputeDevice + 'static> DeviceRegion for GpuRegion<D> {
    fn len(&self) -> usize {
        self.buffer().len_bytes()
    }
    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A unit's upload event; the compute stream waits on `event` on the device.
pub struct GpuReady<D: ComputeDevice> {
    pub event: D::Event,
}

impl<D: ComputeDevice + 'static> ReadyEvent for GpuReady<D> {
    fn is_ready(&self) -> bool {
        self.event.is_complete().unwrap_or(false)
    }
    fn wait(&self) -> Result<()> {
        // See `ReadyEvent::wait`: the GPU compute orders itself after `event` on the device.
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Pinned host memory as a staging slot.
pub struct PinnedSlot<D: ComputeDevice>(pub D::Pinned);

impl<D: ComputeDevice + 'static> SlotMemory for PinnedSlot<D> {
    fn bytes(&self) -> &[u8] {
        self.0.host_bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.host_bytes_mut()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Waits for each copy's event in order and drops its slot (back to the ring), then keeps the
/// event for reuse. Ends when the backend drops its sender.
fn recycle<D: ComputeDevice>(rx: flume::Receiver<InFlight<D>>, spare: Arc<Mutex<Vec<D::Event>>>) {
    while let Ok((event, slot)) = rx.recv() {
        if let Err(e) = event.synchronize() {
            // The context is unusable after a failed copy; the slot is freed with the ring.
            tracing::error!(error = %e, "a staging copy failed");
        }
        drop(slot);
        spare.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

impl<D: ComputeDevice + Send + Sync + 'static> GpuBackend<D> {
    /// Registers a staging ring of `n` slots of `bytes` now, carved from `region` (faulted in
    /// while the driver initialised), for the runtime's first `alloc_staging` of that geometry:
    /// the ring then costs the start-up path nothing but this registration, made right after the
    /// device opened and before kernel modules and the vendor GEMM load.
    pub fn prepare_staging(
        &self,
        region: rocmforge::backend::host::HostRegion,
        n: usize,
        bytes: usize,
    ) -> Result<()> {
        let bufs = self.dev.alloc_pinned_ring(n, bytes, Some(region))?;
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = Some((n, bytes, bufs));
        Ok(())
    }

    /// Creates the copy streams and their recyclers on `dev`.
    pub fn new(dev: Arc<D>, cfg: GpuConfig) -> Result<Self> {
        let mut lanes = Vec::new();
        for i in 0..cfg.copy_streams.max(1) {
            let stream = dev.new_stream()?;
            let spare = Arc::new(Mutex::new(Vec::new()));
            // Unbounded: what is in flight is bounded by the staging ring's slots, and the
            // uploader must never block on a slot's copy (no cycle through bounded channels).
            let (tx, rx) = flume::unbounded::<InFlight<D>>();
            let sp = spare.clone();
            let recycler = std::thread::Builder::new()
                .name(format!("rf-{}-copy{i}", cfg.name))
                .spawn(move || recycle::<D>(rx, sp))
                .map_err(|e| RuntimeError::Spawn {
                    actor: "copy-stream recycler",
                    message: e.to_string(),
                })?;
            lanes.push(Lane {
                stream,
                spare,
                to_recycler: Some(tx),
                recycler: Some(recycler),
            });
        }
        Ok(Self {
            dev,
            cfg,
            lanes,
            counters: Arc::default(),
            pool: Arc::new(RegionPool {
                idle: Mutex::new(Vec::new()),
            }),
            prepared: Mutex::new(None),
        })
    }

    pub fn device(&self) -> &Arc<D> {
        &self.dev
    }

    fn lane(&self, stream: usize) -> Result<&Lane<D>> {
        let n = self.lanes.len();
        self.lanes
            .get(stream % n.max(1))
            .ok_or_else(|| self.err("no copy stream".into()))
    }

    fn err(&self, message: String) -> RuntimeError {
        RuntimeError::Backend {
            backend: self.cfg.name.to_string(),
            message,
        }
    }

    fn region<'a>(&self, dst: &'a mut dyn DeviceRegion) -> Result<&'a mut GpuRegion<D>> {
        let name = self.cfg.name;
        dst.as_any_mut()
            .downcast_mut::<GpuRegion<D>>()
            .ok_or_else(|| RuntimeError::Backend {
                backend: name.to_string(),
                message: "upload into a region of another backend".into(),
            })
    }
}

impl<D: ComputeDevice> Drop for GpuBackend<D> {
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            lane.to_recycler = None;
            if let Some(h) = lane.recycler.take() {
                let _ = h.join();
            }
        }
    }
}

impl<D: ComputeDevice + Send + Sync + 'static> WeightBackend for GpuBackend<D> {
    fn name(&self) -> &str {
        self.cfg.name
    }

    fn computes_from_host(&self) -> bool {
        false
    }

    fn io_geometry(&self) -> IoGeometry {
        default_io_geometry()
    }

    fn device_memory_bytes(&self) -> Option<u64> {
        let (free, _) = self.dev.mem_info().ok()?;
        Some((free as u64).saturating_sub(self.cfg.reserve_bytes))
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceRegion>> {
        let (buf, fence, reused) = match self.pool.take_or_trim(bytes) {
            Some((buf, fence)) => (buf, fence, true),
            // Out of memory is `BackendError::OutOfMemory` (typed, recoverable), not a panic.
            None => (
                self.dev.alloc(bytes, "layer weights (pipeline unit)")?,
                self.dev.new_event(false)?,
                false,
            ),
        };
        self.counters.add(bytes as u64);
        Ok(Box::new(GpuRegion::<D> {
            buf: Some(buf),
            fence: Some(fence),
            fenced: AtomicBool::new(reused),
            wait_before_write: AtomicBool::new(reused),
            counters: self.counters.clone(),
            pool: self.pool.clone(),
        }))
    }

    /// Synchronous copy from pageable memory (a slot that is not pinned); not the hot path.
    fn upload(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        src: &[u8],
        stream: usize,
    ) -> Result<()> {
        let mut pinned = self.dev.alloc_pinned(src.len())?;
        pinned.host_bytes_mut().copy_from_slice(src);
        let lane = self.lane(stream)?;
        let region = self.region(dst)?;
        region.order_first_write(&lane.stream)?;
        // SAFETY: `pinned` and the region outlive the copy: the stream is synchronised below
        // before either can be dropped.
        unsafe {
            self.dev
                .copy_htod_async(&lane.stream, region.buffer(), offset, &pinned, 0, src.len())
        }?;
        lane.stream.synchronize()?;
        Ok(())
    }

    fn upload_slot(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        slot: StagingSlot,
        stream: usize,
    ) -> Result<()> {
        let Some(pinned) = slot
            .memory()
            .and_then(|m| m.as_any().downcast_ref::<PinnedSlot<D>>())
        else {
            return self.upload(dst, offset, slot.data(), stream);
        };
        let lane = self.lane(stream)?;
        let region = self.region(dst)?;
        region.order_first_write(&lane.stream)?;
        // SAFETY: the slot (source) is handed to the recycler below, which keeps it until the
        // event recorded behind this copy completed; the region (destination) is freed or
        // reused only after its fence, recorded behind this copy too (and a reused region's
        // first copy waited for the previous user's fence).
        unsafe {
            self.dev.copy_htod_async(
                &lane.stream,
                region.buffer(),
                offset,
                &pinned.0,
                0,
                slot.len,
            )
        }?;
        region.fence_after(&lane.stream)?;
        let event = match lane.spare.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(e) => e,
            None => self.dev.new_event(false)?,
        };
        lane.stream.record(&event)?;
        let tx = lane
            .to_recycler
            .as_ref()
            .ok_or_else(|| self.err("copy stream shut down".into()))?;
        if let Err(flume::SendError((event, slot))) = tx.send((event, slot)) {
            // The recycler is gone (shutdown): keep the slot out of the ring until the copy
            // finished, here.
            event.synchronize()?;
            drop(slot);
        }
        Ok(())
    }

    fn alloc_staging(&self, n: usize, bytes: usize) -> Result<Vec<Box<dyn SlotMemory>>> {
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let bufs = match prepared {
            Some((pn, pb, bufs)) if pn == n && pb == bytes => bufs,
            // Another geometry was asked for: the prepared ring is freed.
            _ => self.dev.alloc_pinned_ring(n, bytes, None)?,
        };
        Ok(bufs
            .into_iter()
            .map(|p| Box::new(PinnedSlot::<D>(p)) as Box<dyn SlotMemory>)
            .collect())
    }

    fn copy_streams(&self) -> usize {
        self.lanes.len()
    }

    fn ready_event(&self, region: &dyn DeviceRegion, stream: usize) -> Result<Arc<dyn ReadyEvent>> {
        if region.as_any().downcast_ref::<GpuRegion<D>>().is_none() {
            return Err(self.err("readiness of a region of another backend".into()));
        }
        let lane = self.lane(stream)?;
        let event = self.dev.new_event(false)?;
        // Every copy of the unit went to this stream, so this event follows all of them.
        lane.stream.record(&event)?;
        Ok(Arc::new(GpuReady::<D> { event }))
    }

    fn allocated_bytes(&self) -> u64 {
        self.counters.allocated()
    }

    fn peak_allocated_bytes(&self) -> u64 {
        self.counters.peak()
    }
}

#[cfg(test)]
#[path = "gpu_tests.rs"]
mod tests;
