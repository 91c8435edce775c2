//! The embedding API: `Runtime::builder()...build()` starts the five actors and returns a
//! `RuntimeHandle` (`Clone + Send + Sync`).

use crate::error::{Result, RuntimeError};
use crate::messages::{
    FinishReason, GenerateRequest, Hint, LoadProgress, ModelHealth, Pooling, ReadMode, SessionId,
    Stage, StageBusy, Stats, TokenEvent,
};
use crate::pipeline::backend::WeightBackend;
use crate::pipeline::inference::{EmbedTask, Job, StreamItem};
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::ResidencyBoard;
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::Shared;
use crate::pipeline::source::{FileId, ModelSource};
use crate::pipeline::staging::StagingRing;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

mod builder;
mod placement;
pub use builder::{HostLayers, RuntimeBuilder, StageDelays, Tuning};
pub use placement::{ExpectedDecode, Place, PlacedUnit, Placement, Rates, UnitKind};

/// Requests a runtime queues for a place in the running set before `generate` answers
/// `QueueFull`, unless `RuntimeBuilder::queue_capacity` says otherwise.
pub const DEFAULT_QUEUE_CAPACITY: usize = 16;

/// Entry point of the embedding API.
pub struct Runtime;

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }
}

struct Inner {
    /// The model file's accepted identity and reload generation.
    source: Arc<ModelSource>,
    /// The model as opened at build (a reload must find the same model in the file).
    file: rocmforge::gguf::GgufFile,
    read_mode: ReadMode,
    /// When `retry_failed_loads` last asked the Scheduler.
    last_retry: Mutex<Option<Instant>>,
    sched: flume::Sender<SchedMsg>,
    jobs: Mutex<Option<flume::Sender<Job>>>,
    shared: Arc<Shared>,
    board: Arc<ResidencyBoard>,
    cancel: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
    backend: Arc<dyn WeightBackend>,
    rings: [StagingRing; 2],
    plan: Arc<LoadPlan>,
    budget: u64,
    /// The streaming window the Scheduler was given (`prefetch_depth`).
    prefetch_depth: usize,
    queue_capacity: usize,
    next_session: AtomicU64,
    opened: Instant,
}

impl Inner {
    fn shutdown(&self) -> Result<()> {
        let _s = tracing::info_span!("shutdown").entered();
        // Stop accepting work, then cancel: every actor notices within one wait tick, the
        // request in flight and the queued ones get `ShutDown`.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.cancel.cancel();
        self.board.close();
        self.shared.announce_load_event();
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut panicked = 0;
        for t in threads {
            if t.join().is_err() {
                panicked += 1;
            }
        }
        self.board.clear();
        if panicked > 0 {
            return Err(RuntimeError::Stage {
                stage: "shutdown",
                message: format!("{panicked} actor thread(s) panicked"),
            });
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: the actors end with it.
        let _ = self.shutdown();
    }
}

/// A running runtime. Cheap to clone; every clone drives the same actors.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("backend", &self.inner.backend.name())
            .field("layers", &self.inner.plan.n_layers)
            .field("budget", &self.inner.budget)
            .finish()
    }
}

impl RuntimeHandle {
    /// Queues a request; tokens arrive on the returned stream. Dropping the stream cancels the
    /// request within one decode step (one layer, in fact) and frees its KV slot.
    pub fn generate(&self, request: GenerateRequest) -> TokenStream {
        // Tokens buffered ahead of a slow consumer; past that, decoding waits for the reader.
        let (tx, rx) = flume::bounded::<StreamItem>(64);
        let cancel = self.inner.cancel.child_token();
        let finish = Arc::new(Mutex::new(None));
        let stream = TokenStream {
            stream: rx.clone().into_stream(),
            rx,
            finish: finish.clone(),
            _guard: cancel.clone().drop_guard(),
        };
        let job = Job {
            request,
            events: tx.clone(),
            finish,
            cancel,
            embed: None,
        };
        self.submit(job, &tx);
        stream
    }

    /// Queues an embedding of `tokens` (one pass, no generation): the final hidden states of
    /// its positions pooled as `pooling` says and L2-normalized. Shares the queue with
    /// `generate`; dropping the returned value cancels it. A compute without hidden states
    /// (the GPU ones, for now) answers `RuntimeError::Unsupported`.
    pub fn embed(&self, tokens: Vec<u32>, pooling: Pooling) -> EmbeddingReply {
        // The stream carries only a failure; the vector comes on its own channel.
        let (tx, rx) = flume::bounded::<StreamItem>(1);
        let (reply, vector) = flume::bounded(1);
        let cancel = self.inner.cancel.child_token();
        let job = Job {
            request: GenerateRequest::tokens(tokens, 0),
            events: tx.clone(),
            finish: Arc::new(Mutex::new(None)),
            cancel: cancel.clone(),
            embed: Some(EmbedTask { pooling, reply }),
        };
        self.submit(job, &tx);
        EmbeddingReply {
            failure: rx,
            vector,
            _guard: cancel.drop_guard(),
        }
    }

    /// Puts `job` on the queue, or its failure (queue full, shut down) on `tx`.
    fn submit(&self, job: Job, tx: &flume::Sender<StreamItem>) {
        let guard = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let err = match guard.as_ref() {
            None => Some(RuntimeError::ShutDown),
            Some(jobs) => match jobs.try_send(job) {
                Ok(()) => None,
                Err(flume::TrySendError::Full(_)) => Some(RuntimeError::QueueFull {
                    capacity: self.inner.queue_capacity,
                }),
                Err(flume::TrySendError::Disconnected(_)) => Some(RuntimeError::ShutDown),
            },
        };
        if let Some(e) = err {
            let _ = tx.try_send(Err(e));
        }
    }

    /// A new conversation: requests that carry it in `GenerateRequest::session` reuse the KV
    /// cache of the previous one for the prefix they share with it.
    pub fn new_session(&self) -> SessionId {
        SessionId(self.inner.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a hint to the Scheduler and waits for its verdict (it never waits on I/O).
    pub fn hint(&self, hint: Hint) -> Result<()> {
        let (tx, rx) = flume::bounded(1);
        self.inner
            .sched
            .send(SchedMsg::Hint { hint, reply: tx })
            .map_err(|_| RuntimeError::ShutDown)?;
        rx.recv().map_err(|_| RuntimeError::ShutDown)?
    }

    pub fn load_progress(&self) -> LoadProgress {
        self.inner.shared.progress()
    }

    /// Whether the model can be served from its file: failed units, the failures so far, and
    /// whether the file on disk is still the one loaded (one `stat`).
    pub fn model_health(&self) -> ModelHealth {
        let c = &self.inner.shared.counters;
        ModelHealth {
            units_failed: c.units_failed.load(Ordering::Acquire),
            load_failures: c.load_failures.load(Ordering::Relaxed),
            last_failure: self
                .inner
                .shared
                .last_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|f| f.to_error().to_string()),
            file_changed: self.inner.source.changed_on_disk(),
        }
    }

    /// Asks the Scheduler to load the failed units again (at most once a second; no wait). A
    /// request that needs a failed unit retries it anyway; this is for a server whose health
    /// probe must see recovery without client traffic (see docs/SERVING.md).
    pub fn retry_failed_loads(&self) {
        if self
            .inner
            .shared
            .counters
            .units_failed
            .load(Ordering::Acquire)
            == 0
        {
            return;
        }
        let mut last = self
            .inner
            .last_retry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.inner.sched.try_send(SchedMsg::Retry);
    }

    /// Accepts the model file as it is now and loads every unit from it again: after the file
    /// changed (a restore without its timestamp, a new copy of the same model), this is what
    /// lets the runtime read it. The file must hold the same model (metadata and tensor table
    /// equal); a different model needs a new runtime. Weights resident from before are
    /// evicted, so no request mixes the two versions: one computing meanwhile fails with
    /// `ModelReloaded`. Not in `mmap` mode, whose weights are views of the map of the file as
    /// it was opened. Returns once the Scheduler has evicted and started loading.
    pub fn reload(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.read_mode == ReadMode::Mmap {
            return Err(RuntimeError::Config(
                "reload needs read mode `read` or `direct`: in `mmap` mode the weights are \
                 views of the file as it was mapped; restart instead"
                    .into(),
            ));
        }
        let path = inner.source.path().to_path_buf();
        let id = std::fs::metadata(&path)
            .map(|m| FileId::of(&m))
            .map_err(|source| RuntimeError::Open {
                path: path.clone(),
                source,
            })?;
        let now = rocmforge::gguf::GgufFile::open(&path)?;
        if let Some(diff) = model_difference(&inner.file, &now) {
            return Err(RuntimeError::Config(format!(
                "{} now holds a different model ({diff}): a reload serves the same model \
                 again; start a new server for another",
                path.display()
            )));
        }
        drop(now);
        let generation = inner.source.accept(id);
        let (tx, rx) = flume::bounded(1);
        inner
            .sched
            .send(SchedMsg::Reload {
                generation,
                reply: tx,
            })
            .map_err(|_| RuntimeError::ShutDown)?;
        rx.recv().map_err(|_| RuntimeError::ShutDown)??;
        tracing::info!(path = %path.display(), generation, "model reloaded");
        Ok(())
    }

    /// Blocks until the initial load (resident set and first window) is in, or `timeout`.
    pub fn wait_loaded(&self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        let shared = &self.inner.shared;
        let (lock, cv) = &shared.load_events;
        // The flag is set before the event is announced under this lock: checked under it,
        // no announcement is missed.
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if shared.counters.initial_done.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.inner.cancel.is_cancelled() {
                return Err(RuntimeError::ShutDown);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RuntimeError::Stage {
                    stage: "load",
                    message: format!("initial load not done after {timeout:?}"),
                });
            }
            g = cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn is_shut_down(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Time since `build` opened the model.
    pub fn since_open(&self) -> Duration {
        self.inner.opened.elapsed()
    }

    pub fn n_layers(&self) -> usize {
        self.inner.plan.n_layers
    }

    /// Whether the model computes on a device (CUDA, HIP) rather than from host memory.
    pub fn computes_on_device(&self) -> bool {
        !self.inner.backend.computes_from_host()
    }

    /// Where each unit lives under the budget at start (`--explain`): resident, streamed,
    /// loaded when routed (experts), or computed on the host. Hints move units later.
    pub fn placement(&self) -> Placement {
        Placement::of(
            &self.inner.plan,
            self.inner.budget,
            self.inner.prefetch_depth,
        )
    }

    pub fn stats(&self) -> Stats {
        let s = &self.inner.shared;
        let snap = s.snapshot();
        let c = &s.counters;
        Stats {
            budget_bytes: self.inner.budget,
            total_weight_bytes: self.inner.plan.total_dev_bytes(),
            resident_bytes: snap.reserved_bytes,
            peak_resident_bytes: snap.peak_reserved_bytes,
            allocated_bytes: self.inner.backend.allocated_bytes(),
            peak_allocated_bytes: self.inner.backend.peak_allocated_bytes(),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: snap.evictions,
            loads_per_layer: snap.loads_per_unit,
            resident_layers: snap.resident,
            pinned_layers: snap.pinned,
            fixed_layers: snap.fixed,
            prefetch_window: snap.window,
            hint_noops: snap.hint_noops,
            stage_busy: Stage::ALL
                .iter()
                .map(|&st| StageBusy {
                    stage: st.name().to_string(),
                    busy_ns: s.busy_ns(st),
                })
                .collect(),
            kv_slots_in_use: c.kv_slots_in_use.load(Ordering::Acquire),
            running_seqs: c.running_seqs.load(Ordering::Relaxed),
            waiting_seqs: c.held_seqs.load(Ordering::Relaxed)
                + self
                    .inner
                    .jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map_or(0, |j| j.len()),
            kv_blocks_total: c.kv_blocks_total.load(Ordering::Relaxed),
            kv_blocks_used: c.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_cached: c.kv_blocks_cached.load(Ordering::Relaxed),
            prefix_cache_hit_tokens: c.prefix_hit_tokens.load(Ordering::Relaxed),
            kv_block_tokens: c.kv_block_tokens.load(Ordering::Relaxed),
            batch_steps: c
                .batch_steps
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            batch_step_tokens: c.batch_step_tokens.load(Ordering::Relaxed),
            batch_step_sequences: c.batch_step_seqs.load(Ordering::Relaxed),
            requests_done: c.requests_done.load(Ordering::Acquire),
            prompt_tokens_cached: c.prompt_tokens_cached.load(Ordering::Relaxed),
            direct_io: c.direct_io.load(Ordering::Acquire),
        }
    }

    /// Staging slots currently lent out (0 when idle: none leaked).
    pub fn staging_slots_in_use(&self) -> usize {
        self.inner
            .rings
            .iter()
            .map(|r| r.n_slots() - r.free_slots())
            .sum()
    }

    /// Cancels loading and requests, joins every actor thread and frees the weights. Requests in
    /// flight receive `RuntimeError::ShutDown`. Idempotent; other clones see `ShutDown` after.
    pub fn shutdown(&self) -> Result<()> {
        self.inner.shutdown()
    }
}

/// The answer to `RuntimeHandle::embed`. Dropping it cancels the request.
pub struct EmbeddingReply {
    failure: flume::Receiver<StreamItem>,
    vector: flume::Receiver<Vec<f32>>,
    _guard: DropGuard,
}

impl EmbeddingReply {
    /// A failure is queued before the job (and with it the vector's sender) is dropped, so
    /// once the vector channel closes empty, the failure is there to read.
    fn failure(&self) -> RuntimeError {
        match self.failure.try_recv() {
            Ok(Err(e)) => e,
            _ => RuntimeError::ShutDown,
        }
    }

    /// Waits for the vector (async).
    pub async fn get(self) -> Result<Vec<f32>> {
        match self.vector.recv_async().await {
            Ok(v) => Ok(v),
            Err(_) => Err(self.failure()),
        }
    }

    /// Waits for the vector (blocking).
    pub fn wait(self) -> Result<Vec<f32>> {
        match self.vector.recv() {
            Ok(v) => Ok(v),
            Err(_) => Err(self.failure()),
        }
    }
}

/// How the model in `b` differs from the one in `a`, in words (`None`: the same model: equal
/// metadata and tensor table).
fn model_difference(
    a: &rocmforge::gguf::GgufFile,
    b: &rocmforge::gguf::GgufFile,
) -> Option<String> {
    if a.data_offset() != b.data_offset() || a.alignment() != b.alignment() {
        return Some("another header size or alignment".into());
    }
    if !a.metadata().iter().eq(b.metadata().iter()) {
        return Some("other metadata".into());
    }
    if a.tensors() != b.tensors() {
        return Some("another tensor table".into());
    }
    None
}

/// Tokens of one request: an async `Stream`, or a blocking iterator via `into_blocking`.
/// Dropping it cancels the request.
pub struct TokenStream {
    rx: flume::Receiver<StreamItem>,
    stream: flume::r#async::RecvStream<'static, StreamItem>,
    finish: Arc<Mutex<Option<FinishReason>>>,
    _guard: DropGuard,
}

impl TokenStream {
    /// Why generation stopped, once the stream has ended normally.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        *self.finish.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn into_blocking(self) -> BlockingTokens {
        BlockingTokens { inner: self }
    }

    /// Blocking: all tokens, or the first error.
    pub fn collect_tokens(self) -> Result<Vec<u32>> {
        self.into_blocking().map(|r| r.map(|e| e.token)).collect()
    }
}

impl futures::Stream for TokenStream {
    type Item = StreamItem;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamItem>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

/// Blocking iterator over a `TokenStream`.
pub struct BlockingTokens {
    inner: TokenStream,
}

impl BlockingTokens {
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.inner.finish_reason()
    }
}

impl Iterator for BlockingTokens {
    type Item = Result<TokenEvent>;
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.rx.recv().ok()
    }
}
