//! Device memory running out while weights load: the requests that needed them fail with the
//! typed out-of-memory error, the runtime stays up, and once memory is back the next request
//! loads again and answers as before.
//!
//! On the CPU through a backend whose allocations fail on demand (the path every backend
//! shares: the Uploader's `WeightBackend::alloc`); on CUDA with the device really full (a test
//! allocation holding all but a little of its memory), run by `scripts/device-check.sh`.

mod runtime_common;

use rocmforge::backend::BackendError;
use rocmforge::quant::GgmlType;
use rocmforge_actors::pipeline::backend::{
    CpuBackend, DeviceRegion, IoGeometry, ReadyEvent, WeightBackend,
};
use rocmforge_actors::pipeline::staging::{SlotMemory, StagingSlot};
use rocmforge_actors::{GenerateRequest, ReadMode, Runtime, RuntimeError, RuntimeHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const PROMPT: [u32; 6] = [1, 504, 3458, 282, 4649, 314];
const N: usize = 8;

fn request() -> GenerateRequest {
    let mut r = GenerateRequest::tokens(PROMPT.to_vec(), N);
    r.stop_at_eos = false;
    r
}

/// The tokens of one request, or its first error.
fn generate(rt: &RuntimeHandle) -> Result<Vec<u32>, RuntimeError> {
    rt.generate(request())
        .into_blocking()
        .map(|e| e.map(|e| e.token))
        .collect()
}

/// The CPU backend with allocations that fail as a full device's would while `full` is set.
struct Starved {
    inner: CpuBackend,
    full: Arc<AtomicBool>,
}

impl WeightBackend for Starved {
    fn name(&self) -> &str {
        "starved-cpu"
    }
    fn computes_from_host(&self) -> bool {
        self.inner.computes_from_host()
    }
    fn io_geometry(&self) -> IoGeometry {
        self.inner.io_geometry()
    }
    fn device_memory_bytes(&self) -> Option<u64> {
        self.inner.device_memory_bytes()
    }
    fn transcoded_bytes(&self, ty: GgmlType, n_bytes: u64) -> u64 {
        self.inner.transcoded_bytes(ty, n_bytes)
    }
    fn is_pass_through(&self, ty: GgmlType) -> bool {
        self.inner.is_pass_through(ty)
    }
    fn transcode(&self, ty: GgmlType, src: &[u8], dst: &mut [u8]) -> rocmforge_actors::Result<()> {
        self.inner.transcode(ty, src, dst)
    }
    fn alloc(&self, bytes: usize) -> rocmforge_actors::Result<Box<dyn DeviceRegion>> {
        if self.full.load(Ordering::Acquire) {
            return Err(RuntimeError::Device(BackendError::OutOfMemory {
                requested: bytes,
                free: 0,
                what: "layer weights".into(),
            }));
        }
        self.inner.alloc(bytes)
    }
    fn upload(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        src: &[u8],
        stream: usize,
    ) -> rocmforge_actors::Result<()> {
        self.inner.upload(dst, offset, src, stream)
    }
    fn upload_slot(
        &self,
        dst: &mut dyn DeviceRegion,
        offset: usize,
        slot: StagingSlot,
        stream: usize,
    ) -> rocmforge_actors::Result<()> {
        self.inner.upload_slot(dst, offset, slot, stream)
    }
    fn alloc_staging(
        &self,
        n: usize,
        bytes: usize,
    ) -> rocmforge_actors::Result<Vec<Box<dyn SlotMemory>>> {
        self.inner.alloc_staging(n, bytes)
    }
    fn copy_streams(&self) -> usize {
        self.inner.copy_streams()
    }
    fn ready_event(
        &self,
        region: &dyn DeviceRegion,
        stream: usize,
    ) -> rocmforge_actors::Result<Arc<dyn ReadyEvent>> {
        self.inner.ready_event(region, stream)
    }
    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
    fn peak_allocated_bytes(&self) -> u64 {
        self.inner.peak_allocated_bytes()
    }
}

/// An error that says the device ran out of memory (the typed error, kept through the
/// runtime's wrapping).
fn is_out_of_memory(e: &RuntimeError) -> bool {
    let text = e.to_string();
    text.contains("out of device memory")
}

#[test]
fn out_of_memory_fails_the_request_and_the_next_one_loads_again() {
    let model = runtime_common::smollm2();
    let baseline = {
        let rt = Runtime::builder()
            .model(&model)
            .read_mode(ReadMode::Read)
            .build()
            .expect("runtime");
        let t = generate(&rt).expect("tokens");
        rt.shutdown().expect("shutdown");
        t
    };
    let full = Arc::new(AtomicBool::new(true));
    let backend = Starved {
        inner: CpuBackend::new(),
        full: full.clone(),
    };
    // `read` mode: the weights are copied into the backend's memory (in `mmap` mode the CPU
    // computes from the file map and allocates nothing).
    let rt = Runtime::builder()
        .model(&model)
        .read_mode(ReadMode::Read)
        .backend(Arc::new(backend))
        .build()
        .expect("a runtime whose loads fail still starts");
    for _ in 0..2 {
        match generate(&rt) {
            Err(e) => assert!(is_out_of_memory(&e), "not the out-of-memory error: {e}"),
            Ok(t) => panic!("tokens without memory for the weights: {t:?}"),
        }
    }
    // Memory is back: the next request loads and answers as the unstarved runtime did.
    full.store(false, Ordering::Release);
    assert_eq!(
        generate(&rt).expect("tokens after the memory came back"),
        baseline
    );
    rt.shutdown().expect("shutdown");
}
