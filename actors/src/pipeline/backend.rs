//! The backend seam: device memory for layer weights, uploads into it, and readiness.
//!
//! The pipeline only needs three things from a device: memory to hold one layer's weights, a way
//! to copy staged bytes into it (on some stream), and a readiness object the inference actor can
//! wait on. CUDA and HIP implement this trait with device buffers, copy streams and events; the
//! CPU implementation here is a host arena whose "upload" is a `memcpy` and whose readiness is
//! immediate (the copy is synchronous). The GPU implementation, written once for CUDA and HIP
//! over the core crate's role traits, is in `gpu.rs`.

use crate::error::{Result, RuntimeError};
use crate::messages::ReadMode;
use crate::pipeline::staging::{SlotMemory, StagingSlot};
use rocmforge::quant::qtype::GgmlType;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Memory holding one layer's weights on the device.
pub trait DeviceRegion: Send + Sync + 'static {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Host view, for backends that compute on the host (the CPU). `None` on GPUs.
    fn host_bytes(&self) -> Option<&[u8]>;
    /// Backend-specific access (device pointers) for the backend's own compute code.
    fn as_any(&self) -> &dyn Any;
    /// Mutable backend-specific access, used by `WeightBackend::upload` while the region fills.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Something the inference actor waits on before using a layer (an event on GPUs).
pub trait ReadyEvent: Send + Sync + 'static {
    fn is_ready(&self) -> bool;
    /// Makes the layer usable by the caller's next compute. On the CPU the copy already finished
    /// (returns at once). On GPUs it also returns at once without blocking the host: GPU memory
    /// is only read by the GPU compute, which makes its stream wait on the device event (found
    /// through `as_any`) before the layer's kernels, so the ordering is kept on the device.
    fn wait(&self) -> Result<()>;
    /// Backend-specific access (the device event) for the backend's own compute code.
    fn as_any(&self) -> &dyn Any;
}

/// Ready from the start: the CPU's synchronous copy finished before the layer was published.
#[derive(Debug, Default)]
pub struct AlreadyReady;

impl ReadyEvent for AlreadyReady {
    fn is_ready(&self) -> bool {
        true
    }
    fn wait(&self) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A device the pipeline can stream weights into.
/// The reader and staging geometry a backend wants (`RuntimeBuilder` settings win over it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoGeometry {
    pub read_mode: ReadMode,
    /// DiskReader threads.
    pub readers: usize,
    /// Staging ring: slots and bytes per slot.
    pub staging_slots: usize,
    pub slot_size: usize,
}

impl Default for IoGeometry {
    /// The CPU's: compute reads the mapped file itself (zero copy), so two readers that only
    /// advise and touch pages are enough, and the ring is small.
    fn default() -> Self {
        Self {
            read_mode: ReadMode::Mmap,
            readers: 2,
            staging_slots: 8,
            slot_size: 1 << 20,
        }
    }
}

impl IoGeometry {
    /// The CPU's when it reads the file (`read`, `direct`) instead of mapping it: every
    /// streamed layer then passes through the ring, so reads are larger and more are in
    /// flight. On the 2-core VM, a 1B-shape Q4_0 model at a 50% budget in `direct` mode
    /// decoded at 2.1-2.6 tok/s with the mapping geometry (2 readers, 8 x 1 MiB: ~1.0 GB/s of
    /// the disk's 1.5) and 3.4 with 4 readers and 16 x 4 MiB (~1.43 GB/s); 8 readers or 32
    /// slots did no better (docs/PERFORMANCE.md, "Streaming from disk on the CPU"). Models
    /// whose largest layer is under 16 MiB keep 1 MiB slots (a 16 MiB ring).
    pub fn cpu_streaming(read_mode: ReadMode, largest_unit_bytes: u64) -> Self {
        Self {
            read_mode,
            readers: 4,
            staging_slots: 16,
            slot_size: if largest_unit_bytes >= 16 << 20 {
                4 << 20
            } else {
                1 << 20
            },
        }
    }
}

pub trait WeightBackend: Send + Sync + 'static {
    fn name(&self) -> &str;

    /// True when compute reads weights straight from host memory, so that in `mmap` mode the
    /// pipeline can hand out views of the file map instead of copying (zero-copy).
    fn computes_from_host(&self) -> bool;

    /// Device memory available for weights, if known (for budgets given as a fraction).
    /// How the pipeline should feed this backend unless the caller says otherwise.
    fn io_geometry(&self) -> IoGeometry {
        IoGeometry::default()
    }
    fn device_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// Bytes a tensor of `n_bytes` file bytes of type `ty` occupies on the device. Identity for
    /// pass-through; a backend that dequantizes a type without a kernel returns the larger size.
    fn transcoded_bytes(&self, ty: GgmlType, n_bytes: u64) -> u64 {
        let _ = ty;
        n_bytes
    }

    /// True when `transcode` is a plain copy for this type (the staging slot can be forwarded).
    fn is_pass_through(&self, ty: GgmlType) -> bool {
        self.transcoded_bytes(ty, ty.block_bytes()) == ty.block_bytes()
    }

    /// Turns file bytes (whole blocks) into the device format. `dst.len()` is
    /// `transcoded_bytes(ty, src.len())`. Default: pass-through.
    fn transcode(&self, ty: GgmlType, src: &[u8], dst: &mut [u8]) -> Result<()> {
        let _ = ty;
        if src.len() != dst.len() {
            return Err(RuntimeError::Backend {
                backend: self.name().to_string(),
                message: format!("pass-through of {} B into {} B", src.len(), dst.len()),
            });
        }
        dst.copy_from_slice(src);
        Ok(())
    }

    /// Allocates device memory for one layer.
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceRegion>>;

    /// Copies staged bytes into `dst` at `offset`, on copy stream `stream`.
    fn upload(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        src: &[u8],
        stream: usize,
    ) -> Result<()>;

    /// Copies a filled staging slot into `dst` at `offset` on copy stream `stream`, taking the
    /// slot: it must return to its ring (by dropping) only once the copy no longer reads it.
    /// Default: the synchronous `upload`, then the slot returns at once. GPU backends queue an
    /// asynchronous copy from pinned memory and hold the slot until the copy's event completed.
    fn upload_slot(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        slot: StagingSlot,
        stream: usize,
    ) -> Result<()> {
        self.upload(dst, offset, slot.data(), stream)
    }

    /// Memory for the `n` slots of a staging ring, `bytes` each, allocated once when the ring
    /// is built. Default: heap memory; GPU backends return pinned host memory (the only source
    /// the copy engine reads asynchronously at full speed).
    fn alloc_staging(&self, n: usize, bytes: usize) -> Result<Vec<Box<dyn SlotMemory>>> {
        Ok((0..n)
            .map(|_| Box::new(vec![0u8; bytes].into_boxed_slice()) as Box<dyn SlotMemory>)
            .collect())
    }

    /// Copy streams this backend uploads on (the Uploader uses at least this many).
    fn copy_streams(&self) -> usize {
        1
    }

    /// Called once a region is complete; returns what compute waits on.
    fn ready_event(&self, region: &dyn DeviceRegion, stream: usize) -> Result<Arc<dyn ReadyEvent>>;

    /// Bytes of weight memory allocated now, and the peak since start (leak and budget checks).
    fn allocated_bytes(&self) -> u64;
    fn peak_allocated_bytes(&self) -> u64;
}

/// Allocation counters shared by a backend and its regions (host arena and GPU alike).
#[derive(Debug, Default)]
pub(crate) struct ArenaCounters {
    allocated: AtomicU64,
    peak: AtomicU64,
}

impl ArenaCounters {
    /// Counts `bytes` as allocated and raises the peak.
    pub(crate) fn add(&self, bytes: u64) {
        let now = self.allocated.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }
    pub(crate) fn sub(&self, bytes: u64) {
        self.allocated.fetch_sub(bytes, Ordering::AcqRel);
    }
    pub(crate) fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Acquire)
    }
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
}

/// The CPU backend: "device memory" is host memory, upload is a copy.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    counters: Arc<ArenaCounters>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

/// One layer's weights in the host arena. Freed (and uncounted) on drop.
#[derive(Debug)]
pub struct HostRegion {
    buf: Box<[u8]>,
    counters: Arc<ArenaCounters>,
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        self.counters.sub(self.buf.len() as u64);
    }
}

impl DeviceRegion for HostRegion {
    fn len(&self) -> usize {
        self.buf.len()
    }
    fn host_bytes(&self) -> Option<&[u8]> {
        Some(&self.buf)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl WeightBackend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn computes_from_host(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceRegion>> {
        let mut v = Vec::new();
        v.try_reserve_exact(bytes)
            .map_err(|e| RuntimeError::Backend {
                backend: "cpu".into(),
                message: format!("allocating {bytes} B of host arena: {e}"),
            })?;
        v.resize(bytes, 0u8);
        self.counters.add(bytes as u64);
        Ok(Box::new(HostRegion {
            buf: v.into_boxed_slice(),
            counters: self.counters.clone(),
        }))
    }

    fn upload(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        src: &[u8],
        _stream: usize,
    ) -> Result<()> {
        let bad = |m: String| RuntimeError::Backend {
            backend: "cpu".into(),
            message: m,
        };
        let region = dst
            .as_any_mut()
            .downcast_mut::<HostRegion>()
            .ok_or_else(|| bad("upload into a region of another backend".into()))?;
        let end = offset
            .checked_add(src.len())
            .filter(|&e| e <= region.buf.len())
            .ok_or_else(|| {
                bad(format!(
                    "upload of {} B at {offset} overruns a {} B region",
                    src.len(),
                    region.buf.len()
                ))
            })?;
        region.buf[offset..end].copy_from_slice(src);
        Ok(())
    }

    fn ready_event(&self, _: &dyn DeviceRegion, _: usize) -> Result<Arc<dyn ReadyEvent>> {
        Ok(Arc::new(AlreadyReady))
    }

    fn allocated_bytes(&self) -> u64 {
        self.counters.allocated()
    }

    fn peak_allocated_bytes(&self) -> u64 {
        self.counters.peak()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_arena_counts_and_frees() {
        let b = CpuBackend::new();
        let mut r = b.alloc(100).unwrap();
        b.upload(&mut *r, 10, &[7u8; 20], 0).unwrap();
        assert!(b.upload(&mut *r, 90, &[7u8; 20], 0).is_err());
        assert_eq!(r.host_bytes().unwrap()[10], 7);
        assert_eq!(b.allocated_bytes(), 100);
        drop(r);
        assert_eq!(b.allocated_bytes(), 0);
        assert_eq!(b.peak_allocated_bytes(), 100);
    }

    #[test]
    fn cpu_streaming_geometry_reads_more_and_larger_for_large_layers() {
        let map = IoGeometry::default();
        let small = IoGeometry::cpu_streaming(ReadMode::Read, 3 << 20);
        let large = IoGeometry::cpu_streaming(ReadMode::Direct, 34 << 20);
        assert_eq!(small.read_mode, ReadMode::Read);
        assert_eq!(large.read_mode, ReadMode::Direct);
        for g in [small, large] {
            assert!(g.readers > map.readers && g.staging_slots > map.staging_slots);
        }
        // A small model keeps 1 MiB slots; a layer of tens of MiB gets 4 MiB reads.
        assert_eq!(small.slot_size, 1 << 20);
        assert_eq!(large.slot_size, 4 << 20);
    }
}
