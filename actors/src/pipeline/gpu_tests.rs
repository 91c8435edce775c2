//! Host tests of the generic GPU backend over a mock device whose streams run only when the test
//! says so: that makes "the slot stays out of the ring until its copy completed" observable.

use super::*;
use crate::pipeline::staging::StagingRing;
use rocmforge::backend::{BackendError, BackendResult};
use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::Condvar;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Flag {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Flag {
    fn set(&self, v: bool) {
        *self.done.lock().unwrap() = v;
        self.cv.notify_all();
    }
}

enum Op {
    Copy {
        dst: Arc<Mutex<Vec<u8>>>,
        off: usize,
        /// Address of the pinned source, read when the op runs (as a copy engine would).
        src: usize,
        len: usize,
    },
    Signal(Arc<Flag>),
    /// A stream waiting on an event: the event must have completed when this op runs (every
    /// test here records and waits on the same copy stream, which runs in order).
    Wait(Arc<Flag>),
}

type Queue = Arc<Mutex<VecDeque<Op>>>;

fn run_queue(q: &Queue) {
    let ops: Vec<Op> = q.lock().unwrap().drain(..).collect();
    for op in ops {
        match op {
            Op::Copy { dst, off, src, len } => {
                // SAFETY: the GPU backend keeps the pinned slot alive (held by its recycler)
                // until the Signal queued after this copy ran; this is what the tests check.
                let s = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
                dst.lock().unwrap()[off..off + len].copy_from_slice(s);
            }
            Op::Signal(f) => f.set(true),
            Op::Wait(f) => assert!(
                *f.done.lock().unwrap(),
                "a stream went past a wait on an event that had not completed"
            ),
        }
    }
}

#[derive(Debug)]
struct MockBuf {
    mem: Arc<Mutex<Vec<u8>>>,
    used: Arc<AtomicUsize>,
}

// SAFETY: the mock device's memory is host memory it owns for its whole life; no kernel is
// ever launched on it (the mock's "copies" are memcpys into the same `Vec`).
unsafe impl DeviceBuffer for MockBuf {
    fn device_ptr(&self) -> u64 {
        self.mem.lock().unwrap().as_ptr() as u64
    }
    fn len_bytes(&self) -> usize {
        self.mem.lock().unwrap().len()
    }
}

impl Drop for MockBuf {
    fn drop(&mut self) {
        self.used.fetch_sub(self.len_bytes(), Ordering::AcqRel);
    }
}

struct MockPinned(Box<[u8]>);

impl PinnedHost for MockPinned {
    fn host_bytes(&self) -> &[u8] {
        &self.0
    }
    fn host_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

struct MockEvent(Arc<Flag>);

impl DeviceEvent for MockEvent {
    fn synchronize(&self) -> BackendResult<()> {
        let mut g = self.0.done.lock().unwrap();
        while !*g {
            g = self.0.cv.wait(g).unwrap();
        }
        Ok(())
    }
    fn is_complete(&self) -> BackendResult<bool> {
        Ok(*self.0.done.lock().unwrap())
    }
    fn elapsed_ms(&self, _end: &Self) -> BackendResult<f32> {
        Err(BackendError::InvalidArgument {
            op: "elapsed_ms",
            what: "mock events do not time".into(),
        })
    }
}

/// A queue of ops and the device's count of stream waits.
struct MockStream(Queue, Arc<AtomicUsize>);

impl DeviceStream for MockStream {
    type Event = MockEvent;
    fn record(&self, event: &MockEvent) -> BackendResult<()> {
        event.0.set(false);
        self.0
            .lock()
            .unwrap()
            .push_back(Op::Signal(event.0.clone()));
        Ok(())
    }
    fn wait(&self, event: &MockEvent) -> BackendResult<()> {
        self.1.fetch_add(1, Ordering::AcqRel);
        self.0.lock().unwrap().push_back(Op::Wait(event.0.clone()));
        Ok(())
    }
    fn synchronize(&self) -> BackendResult<()> {
        run_queue(&self.0);
        Ok(())
    }
}

/// A device with `capacity` bytes whose streams run only in `run_all` (or a synchronize).
struct MockDevice {
    capacity: usize,
    used: Arc<AtomicUsize>,
    queues: Mutex<Vec<Queue>>,
    waits: Arc<AtomicUsize>,
}

impl MockDevice {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: Arc::default(),
            queues: Mutex::default(),
            waits: Arc::default(),
        })
    }
    fn run_all(&self) {
        for q in self.queues.lock().unwrap().iter() {
            run_queue(q);
        }
    }
}

impl ComputeDevice for MockDevice {
    type Buf = MockBuf;
    type Pinned = MockPinned;
    type Stream = MockStream;
    type Event = MockEvent;
    fn describe(&self) -> String {
        "mock".into()
    }
    fn warp_size(&self) -> u32 {
        32
    }
    fn mem_info(&self) -> BackendResult<(usize, usize)> {
        Ok((
            self.capacity - self.used.load(Ordering::Acquire),
            self.capacity,
        ))
    }
    fn alloc(&self, bytes: usize, what: &str) -> BackendResult<MockBuf> {
        let free = self.capacity - self.used.load(Ordering::Acquire);
        if bytes > free {
            return Err(BackendError::OutOfMemory {
                requested: bytes,
                free,
                what: what.into(),
            });
        }
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Ok(MockBuf {
            mem: Arc::new(Mutex::new(vec![0; bytes])),
            used: self.used.clone(),
        })
    }
    fn alloc_pinned(&self, bytes: usize) -> BackendResult<MockPinned> {
        Ok(MockPinned(vec![0; bytes].into_boxed_slice()))
    }
    fn new_stream(&self) -> BackendResult<MockStream> {
        let q = Queue::default();
        self.queues.lock().unwrap().push(q.clone());
        Ok(MockStream(q, self.waits.clone()))
    }
    fn new_event(&self, _timing: bool) -> BackendResult<MockEvent> {
        let f = Flag::default();
        f.set(true);
        Ok(MockEvent(Arc::new(f)))
    }
    unsafe fn copy_htod_async(
        &self,
        stream: &MockStream,
        dst: &MockBuf,
        dst_off: usize,
        src: &MockPinned,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()> {
        if dst_off + len > dst.len_bytes() || src_off + len > src.0.len() {
            return Err(BackendError::InvalidArgument {
                op: "copy_htod_async",
                what: format!("{len} B at {dst_off}"),
            });
        }
        stream.0.lock().unwrap().push_back(Op::Copy {
            dst: dst.mem.clone(),
            off: dst_off,
            src: src.0.as_ptr() as usize + src_off,
            len,
        });
        Ok(())
    }
}

fn backend(dev: &Arc<MockDevice>, reserve: u64) -> GpuBackend<MockDevice> {
    GpuBackend::new(
        dev.clone(),
        GpuConfig {
            name: "mock",
            copy_streams: 2,
            reserve_bytes: reserve,
        },
    )
    .expect("mock backend")
}

fn region_bytes(r: &dyn DeviceRegion) -> Vec<u8> {
    let g = r
        .as_any()
        .downcast_ref::<GpuRegion<MockDevice>>()
        .expect("mock region");
    g.buffer().mem.lock().unwrap().clone()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn slot_returns_to_the_ring_only_after_its_copy_completed() {
    let dev = MockDevice::new(1 << 20);
    let b = backend(&dev, 0);
    let ring = StagingRing::with_memory(2, 16, |n, size| b.alloc_staging(n, size)).expect("ring");
    let mut slot = ring
        .acquire(&tokio_util::sync::CancellationToken::new())
        .expect("slot");
    let data: Vec<u8> = (1..=16).collect();
    slot.buffer_mut().copy_from_slice(&data);
    slot.len = 16;
    let mut region = b.alloc(32).expect("region");
    b.upload_slot(&mut *region, 8, slot, 1).expect("queued");
    let ready = b.ready_event(&*region, 1).expect("event");
    // Queued, not run: the slot stays lent out and nothing arrived yet.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(ring.free_slots(), 1, "slot recycled before its copy ran");
    assert!(!ready.is_ready());
    assert!(region_bytes(&*region).iter().all(|&x| x == 0));
    dev.run_all();
    wait_until("slot back in the ring", || ring.free_slots() == 2);
    assert!(ready.is_ready());
    assert_eq!(&region_bytes(&*region)[8..24], &data[..]);
    // The ready event downcasts to the device event the compute stream waits on.
    assert!(ready
        .as_any()
        .downcast_ref::<GpuReady<MockDevice>>()
        .is_some());
}

#[test]
fn pageable_slots_fall_back_to_a_synchronous_copy() {
    let dev = MockDevice::new(1 << 20);
    let b = backend(&dev, 0);
    let ring = StagingRing::new(1, 8);
    let mut slot = ring
        .acquire(&tokio_util::sync::CancellationToken::new())
        .expect("slot");
    slot.buffer_mut().copy_from_slice(&[9; 8]);
    slot.len = 8;
    let mut region = b.alloc(8).expect("region");
    b.upload_slot(&mut *region, 0, slot, 0).expect("copy");
    assert_eq!(region_bytes(&*region), vec![9; 8]);
    assert_eq!(ring.free_slots(), 1);
    // Overrunning the region is an error, not a write past the end.
    let mut slot = ring
        .acquire(&tokio_util::sync::CancellationToken::new())
        .expect("slot");
    slot.len = 8;
    assert!(b.upload_slot(&mut *region, 4, slot, 0).is_err());
}

#[test]
fn out_of_memory_is_a_typed_error_and_counters_track_regions() {
    let dev = MockDevice::new(100);
    let b = backend(&dev, 0);
    match b.alloc(200) {
        Err(RuntimeError::Device(BackendError::OutOfMemory { requested, .. })) => {
            assert_eq!(requested, 200)
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("200 B fit a 100 B device"),
    }
    let r = b.alloc(60).expect("fits");
    assert_eq!(b.allocated_bytes(), 60);
    assert!(b.alloc(60).is_err(), "second region does not fit");
    drop(r);
    assert_eq!(b.allocated_bytes(), 0);
    assert_eq!(b.peak_allocated_bytes(), 60);
    assert!(b.alloc(60).is_ok(), "memory came back");
}

#[test]
fn default_budget_is_free_memory_minus_the_reserve() {
    let dev = MockDevice::new(1000);
    assert_eq!(backend(&dev, 300).device_memory_bytes(), Some(700));
    assert_eq!(backend(&dev, 5000).device_memory_bytes(), Some(0));
    assert!(!backend(&dev, 0).computes_from_host());
    assert_eq!(backend(&dev, 0).copy_streams(), 2);
}

#[test]
fn an_evicted_region_is_reused_after_its_last_use_on_the_device() {
    let dev = MockDevice::new(1 << 20);
    let b = backend(&dev, 0);
    let ring = StagingRing::with_memory(2, 4, |n, size| b.alloc_staging(n, size)).expect("ring");
    let live = tokio_util::sync::CancellationToken::new();
    let upload = |region: &mut Box<dyn DeviceRegion>, byte: u8| {
        let mut slot = ring.acquire(&live).expect("slot");
        slot.buffer_mut().copy_from_slice(&[byte; 4]);
        slot.len = 4;
        b.upload_slot(&mut **region, 0, slot, 0).expect("queued");
    };
    let device_bytes = || dev.used.load(Ordering::Acquire);
    let mut first = b.alloc(4).expect("region");
    upload(&mut first, 1);
    // Evicted while its copy is still queued: nothing blocks, the memory waits in the pool.
    drop(first);
    assert_eq!(b.allocated_bytes(), 0);
    assert_eq!(device_bytes(), 4, "the allocation is kept for reuse");
    // The next unit of that size takes it; its first copy waits for the first one's fence on
    // the stream (the mock asserts the order when the queue runs).
    let mut second = b.alloc(4).expect("reused region");
    assert_eq!(device_bytes(), 4, "no new allocation");
    upload(&mut second, 2);
    assert_eq!(
        dev.waits.load(Ordering::Acquire),
        1,
        "the reused region's copy must wait"
    );
    dev.run_all();
    assert_eq!(region_bytes(&*second), vec![2; 4]);
    drop(second);
    // A unit of another size frees the pool first: the device never holds idle memory beside it.
    let third = b.alloc(8).expect("region");
    assert_eq!(device_bytes(), 8);
    drop(third);
}
