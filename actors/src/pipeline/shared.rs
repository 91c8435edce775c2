//! State shared between the actors and the handle: counters only (atomics), so reading stats
//! never waits on an actor.

use crate::messages::{LoadProgress, Stage};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct Counters {
    pub busy_ns: [AtomicU64; 5],
    pub read_bytes: AtomicU64,
    pub transcoded_bytes: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub initial_bytes: AtomicU64,
    pub initial_done: AtomicBool,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub kv_slots_in_use: AtomicUsize,
    pub requests_done: AtomicU64,
    pub prompt_tokens_cached: AtomicU64,
    pub direct_io: AtomicBool,
    /// Loads that failed (each failed attempt of a unit once).
    pub load_failures: AtomicU64,
    /// Units whose last load failed and that have not loaded since.
    pub units_failed: AtomicUsize,
    /// Whether the Scheduler wants a `Done` per computed unit. Off while every unit is resident
    /// and fixed (nothing streams, nothing waits for eviction): then a decode step sends it no
    /// message at all, and its thread does not wake 30 times a token beside the compute.
    pub wants_done: AtomicBool,
    /// Continuous batching, published by the Inference actor after every step: sequences
    /// running, those taken from the queue that wait (for KV room or their session), the KV
    /// pool.
    pub running_seqs: AtomicUsize,
    pub held_seqs: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_cached: AtomicUsize,
    /// Prompt tokens whose KV a new sequence took from the prefix cache.
    pub prefix_hit_tokens: AtomicU64,
    pub kv_block_tokens: AtomicUsize,
    /// Steps by sequences carried (buckets of `batch::BATCH_BUCKETS`, then `+Inf`).
    pub batch_steps: [AtomicU64; crate::pipeline::batch::BATCH_BUCKETS.len() + 1],
    /// Tokens and sequences carried by all steps.
    pub batch_step_tokens: AtomicU64,
    pub batch_step_seqs: AtomicU64,
}

/// The scheduler's view, copied out after every event it handles.
#[derive(Debug, Clone, Default)]
pub struct ResidencySnapshot {
    pub reserved_bytes: u64,
    pub peak_reserved_bytes: u64,
    pub evictions: u64,
    pub loads_per_unit: Vec<u64>,
    pub resident: Vec<bool>,
    pub pinned: Vec<usize>,
    pub fixed: Vec<usize>,
    pub window: usize,
    pub hint_noops: u64,
}

#[derive(Default)]
pub struct Shared {
    pub counters: Counters,
    pub residency: Mutex<ResidencySnapshot>,
    /// The most recent load failure (kept after recovery, for the record).
    pub last_failure: Mutex<Option<crate::pipeline::residency::LoadFailure>>,
    /// Signalled when the initial load is done and at shutdown (`RuntimeHandle::wait_loaded`).
    pub load_events: (Mutex<()>, std::sync::Condvar),
}

fn stage_index(s: Stage) -> usize {
    match s {
        Stage::Read => 0,
        Stage::Transcode => 1,
        Stage::Upload => 2,
        Stage::Schedule => 3,
        Stage::Compute => 4,
    }
}

impl Shared {
    /// Wakes everyone in `wait_loaded` to look again (the load finished, or shutdown).
    pub fn announce_load_event(&self) {
        let _g = self.load_events.0.lock().unwrap_or_else(|p| p.into_inner());
        self.load_events.1.notify_all();
    }

    pub fn add_busy(&self, stage: Stage, since: Instant) {
        let ns = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.counters.busy_ns[stage_index(stage)].fetch_add(ns, Ordering::Relaxed);
    }

    pub fn busy_ns(&self, stage: Stage) -> u64 {
        self.counters.busy_ns[stage_index(stage)].load(Ordering::Relaxed)
    }

    pub fn progress(&self) -> LoadProgress {
        let c = &self.counters;
        LoadProgress {
            initial_bytes: c.initial_bytes.load(Ordering::Acquire),
            read_bytes: c.read_bytes.load(Ordering::Acquire),
            transcoded_bytes: c.transcoded_bytes.load(Ordering::Acquire),
            uploaded_bytes: c.uploaded_bytes.load(Ordering::Acquire),
            initial_done: c.initial_done.load(Ordering::Acquire),
        }
    }

    pub fn snapshot(&self) -> ResidencySnapshot {
        self.residency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Blocks this actor thread on `fut` until it completes, or returns `None` as soon as `cancel`
/// fires (checked first). Actor threads are plain OS threads (CPU work must not sit on the async
/// runtime), so this drives the two futures itself: nothing polls on a timer, the thread sleeps
/// until one of them wakes it.
pub fn block_on_or_cancel<F: std::future::Future>(
    fut: F,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<F::Output> {
    futures::executor::block_on(async {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            v = fut => Some(v),
        }
    })
}

/// Receives a message, or `None` once `cancel` fires or every sender is gone.
pub fn recv_or_cancel<T>(
    rx: &flume::Receiver<T>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<T> {
    block_on_or_cancel(rx.recv_async(), cancel).and_then(Result::ok)
}

/// The readiness half of an actor's start: the thread reports once it initialised (or why it
/// could not), so a failure at start is an error from `spawn`, not a dead thread.
pub struct Readiness(flume::Sender<crate::error::Result<()>>);

impl Readiness {
    /// Initialised: `spawn` returns the thread's handle.
    pub fn ready(&self) {
        let _ = self.0.send(Ok(()));
    }
    /// Could not start: `spawn` joins the thread and returns `e`.
    pub fn fail(&self, e: crate::error::RuntimeError) {
        let _ = self.0.send(Err(e));
    }
}

/// Starts actor thread `name` running `body` and waits for its readiness report (the one
/// handshake every actor uses).
pub fn spawn_actor(
    actor: &'static str,
    name: String,
    body: impl FnOnce(Readiness) + Send + 'static,
) -> crate::error::Result<std::thread::JoinHandle<()>> {
    start_actor(actor, name, body)?.wait()
}

/// Starts actor thread `name` running `body` without waiting for its readiness: the caller
/// does other work meanwhile and then [`Starting::wait`]s (the inference actor builds its
/// compute this way while the other actors start and the first weights load).
pub fn start_actor(
    actor: &'static str,
    name: String,
    body: impl FnOnce(Readiness) + Send + 'static,
) -> crate::error::Result<Starting> {
    let (tx, rx) = flume::bounded(1);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || body(Readiness(tx)))
        .map_err(|e| crate::error::RuntimeError::Spawn {
            actor,
            message: e.to_string(),
        })?;
    Ok(Starting { actor, handle, rx })
}

/// An actor thread started by [`start_actor`] whose readiness is still to be awaited.
pub struct Starting {
    actor: &'static str,
    handle: std::thread::JoinHandle<()>,
    rx: flume::Receiver<crate::error::Result<()>>,
}

impl Starting {
    /// Waits for the readiness report: the running thread, or its start-up error (the thread
    /// joined).
    pub fn wait(self) -> crate::error::Result<std::thread::JoinHandle<()>> {
        use crate::error::RuntimeError;
        match self.rx.recv() {
            Ok(Ok(())) => Ok(self.handle),
            Ok(Err(e)) => {
                let _ = self.handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = self.handle.join();
                Err(RuntimeError::Spawn {
                    actor: self.actor,
                    message: "thread exited before reporting readiness".into(),
                })
            }
        }
    }
}
