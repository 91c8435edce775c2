//! The embedding API: `Runtime::builder()...build()` starts the five actors and returns a
//! `RuntimeHandle` (`Clone + Send + Sync`).

use crate::compute::ComputeFactory;
use crate::error::{Result, RuntimeError};
use crate::messages::{
    FinishReason, GenerateRequest, Hint, LoadProgress, MemoryBudget, ModelHealth, Pooling,
    ReadMode, SessionId, Stage, StageBusy, Stats, TokenEvent,
};
use crate::pipeline::backend::{CpuBackend, WeightBackend};
use crate::pipeline::inference::{self, EmbedTask, Job, StreamItem};
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::ResidencyBoard;
use crate::pipeline::scheduler::{self, fit_budget, SchedMsg};
use crate::pipeline::shared::Shared;
use crate::pipeline::source::{FileId, ModelSource};
use crate::pipeline::staging::StagingRing;
use crate::pipeline::{reader, transcode, uploader};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Entry point of the embedding API.
pub struct Runtime;

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }
}

/// Artificial per-unit-of-work delays, to model a slow disk or a slow device in tests and benches.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageDelays {
    pub read_per_chunk: Duration,
    pub transcode_per_chunk: Duration,
    pub upload_per_chunk: Duration,
}

pub struct RuntimeBuilder {
    model: Option<PathBuf>,
    /// The model opened already (`model_file`): not parsed a second time.
    opened: Option<rocmforge::gguf::GgufFile>,
    backend: Option<Arc<dyn WeightBackend>>,
    budget: MemoryBudget,
    prefetch_depth: usize,
    /// The four below: `None` takes the backend's suggestion (`WeightBackend::io_geometry`).
    read_mode: Option<ReadMode>,
    readers: Option<usize>,
    transcode_threads: usize,
    staging_slots: Option<usize>,
    slot_size: Option<usize>,
    upload_streams: usize,
    queue_capacity: usize,
    max_sessions: usize,
    batch: crate::pipeline::batch::BatchOptions,
    compute_threads: Option<usize>,
    channel_capacity: Option<usize>,
    compute: Option<ComputeFactory>,
    delays: StageDelays,
    device: Option<(
        rocmforge::backend::BackendKind,
        crate::compute::gpu::GpuPipelineOptions,
    )>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self {
            model: None,
            opened: None,
            backend: None,
            budget: MemoryBudget::Unlimited,
            prefetch_depth: 2,
            read_mode: None,
            readers: None,
            transcode_threads: 1,
            staging_slots: None,
            slot_size: None,
            upload_streams: 1,
            queue_capacity: 16,
            max_sessions: 4,
            batch: Default::default(),
            compute_threads: None,
            channel_capacity: None,
            compute: None,
            delays: StageDelays::default(),
            device: None,
        }
    }
}

impl RuntimeBuilder {
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model = Some(path.into());
        self.opened = None;
        self
    }

    /// The model, opened (and validated) already by the caller, so `build` does not parse it
    /// again.
    pub fn model_file(mut self, file: rocmforge::gguf::GgufFile) -> Self {
        self.model = Some(file.path().to_path_buf());
        self.opened = Some(file);
        self
    }

    /// Conversations (`GenerateRequest::session`) whose KV cache is kept between requests;
    /// beyond it the least recently used is dropped (default 4; 0 keeps none).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = n;
        self
    }

    /// Sequences that run at once by continuous batching (default
    /// `batch::DEFAULT_MAX_NUM_SEQS`); more requests wait in the queue. A compute that runs one
    /// sequence at a time (the GPU ones, for now) runs one whatever this says.
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.batch.max_num_seqs = n.max(1);
        self
    }

    /// Tokens one step carries, decode tokens and prompt chunks together (default
    /// `batch::DEFAULT_MAX_BATCH_TOKENS`): a prompt longer than this is read in chunks, and
    /// decoding sequences wait at most one chunk for their next token.
    pub fn max_batch_tokens(mut self, n: usize) -> Self {
        self.batch.max_batch_tokens = n.max(1);
        self
    }

    /// Bytes of KV cache all sequences share (the paged pool of the CPU compute); default:
    /// room for `max_num_seqs` whole contexts, capped at half the memory available. A request
    /// waits in the queue until its prompt and `max_tokens` fit.
    pub fn kv_budget(mut self, bytes: u64) -> Self {
        self.batch.kv_budget = Some(bytes);
        self
    }

    /// Threads the compute's parallel loops use (CPU backend); default: one per core.
    pub fn compute_threads(mut self, n: usize) -> Self {
        self.compute_threads = Some(n);
        self
    }
    pub fn backend(mut self, backend: Arc<dyn WeightBackend>) -> Self {
        self.backend = Some(backend);
        self
    }
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = budget;
        self
    }
    /// Streamed layers loading ahead of compute (`k`); at least 1.
    pub fn prefetch_depth(mut self, k: usize) -> Self {
        self.prefetch_depth = k.max(1);
        self
    }
    pub fn read_mode(mut self, mode: ReadMode) -> Self {
        self.read_mode = Some(mode);
        self
    }
    pub fn readers(mut self, n: usize) -> Self {
        self.readers = Some(n.max(1));
        self
    }
    pub fn transcode_threads(mut self, n: usize) -> Self {
        self.transcode_threads = n.max(1);
        self
    }
    /// The staging ring: `slots` buffers of `slot_size` bytes, allocated once.
    pub fn staging(mut self, slots: usize, slot_size: usize) -> Self {
        self.staging_slots = Some(slots.max(1));
        self.slot_size = Some(slot_size);
        self
    }
    pub fn upload_streams(mut self, n: usize) -> Self {
        self.upload_streams = n.max(1);
        self
    }
    /// Requests waiting for a place in the running set (`max_num_seqs`, KV room) before
    /// `generate` answers `QueueFull`.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }
    /// Overrides the capacity of every pipeline channel (tests use 1 to prove there is no cycle
    /// of bounded channels).
    pub fn channel_capacity(mut self, n: usize) -> Self {
        self.channel_capacity = Some(n.max(1));
        self
    }
    /// The model computation (default: the llama-family CPU forward pass).
    pub fn compute(mut self, factory: ComputeFactory) -> Self {
        self.compute = Some(factory);
        self
    }
    /// Picks the device by kind (`cpu`, `cuda`, `hip`, `auto`): a GPU brings its weight backend
    /// (pinned staging ring, copy streams, events) and its compute (see `gpu_compute.rs`).
    /// `backend(..)` and `compute(..)`, when also given, win. Without any of the three: `auto`
    /// (a GPU when one opens, else the CPU), the default of every entry point.
    pub fn device(self, kind: rocmforge::backend::BackendKind) -> Self {
        self.device_with(kind, Default::default())
    }
    /// [`RuntimeBuilder::device`] with GPU options (KV context, batch, copy streams).
    pub fn device_with(
        mut self,
        kind: rocmforge::backend::BackendKind,
        opt: crate::compute::gpu::GpuPipelineOptions,
    ) -> Self {
        self.device = Some((kind, opt));
        self
    }
    pub fn stage_delays(mut self, d: StageDelays) -> Self {
        self.delays = d;
        self
    }

    /// Opens the model, checks the budget, starts the actors and begins loading. Returns once
    /// every actor is running; loading continues in the background (see `load_progress`).
    pub fn build(mut self) -> Result<RuntimeHandle> {
        let path = self.model.clone().ok_or(RuntimeError::NoModel)?;
        let span = tracing::info_span!("build");
        let _g = span.enter();
        // The identity first: a file that changes between this and the open below fails the
        // first check of a read (never the other way round: bytes taken for the loaded file). A
        // file the caller opened already (`model_file`) was parsed just before, at start-up.
        let source = Arc::new(ModelSource::open(&path)?);
        let file = match self.opened.take() {
            Some(f) => f,
            None => rocmforge::gguf::GgufFile::open(&path)?,
        };
        // A compute given without a backend is a host compute (the CPU's); otherwise the
        // device asked for, `auto` by default.
        let device = match (&self.compute, self.device) {
            (_, Some(d)) => Some(d),
            (None, None) => Some((rocmforge::backend::BackendKind::Auto, Default::default())),
            (Some(_), None) => None,
        };
        let gpu = match (&self.backend, device) {
            (None, Some((kind, opt))) => crate::compute::gpu::open_pipeline(kind, &file, opt)?,
            _ => None,
        };
        let backend: Arc<dyn WeightBackend> = match (&self.backend, &gpu) {
            (Some(b), _) => b.clone(),
            (None, Some(g)) => g.backend.clone(),
            (None, None) => Arc::new(CpuBackend::new()),
        };
        let plan = LoadPlan::new(&file, &*backend)?;
        // What the caller set wins; the rest is the backend's suggestion (a GPU reads with many
        // threads straight into pinned slots, the CPU maps the file).
        let io = backend.io_geometry();
        let read_mode = self.read_mode.unwrap_or(io.read_mode);
        let n_readers = self.readers.unwrap_or(io.readers).max(1);
        let staging_slots = self.staging_slots.unwrap_or(io.staging_slots).max(1);
        let slot_size = self.slot_size.unwrap_or(io.slot_size);
        let total = plan.total_dev_bytes();
        let budget = match self.budget {
            // A GPU's default: its free memory minus KV cache and workspace (the backend knows
            // what it reserved); the CPU has no fixed limit.
            MemoryBudget::Unlimited => backend.device_memory_bytes().unwrap_or(u64::MAX),
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::FractionOfWeights(f) if f > 0.0 && f <= 1.0 => (f * total as f64) as u64,
            MemoryBudget::FractionOfWeights(f) => {
                return Err(RuntimeError::Config(format!(
                    "budget fraction {f} outside (0, 1]"
                )))
            }
        };
        // Fails fast (before any thread) when not even the global tensors plus one layer fit;
        // streams the output head when that is what it takes.
        let plan = Arc::new(fit_budget(
            plan,
            &file,
            &*backend,
            budget,
            self.prefetch_depth,
        )?);
        let max_block = plan
            .units
            .iter()
            .flat_map(|u| &u.tensors)
            .map(|t| {
                backend
                    .transcoded_bytes(t.ty, t.ty.block_bytes())
                    .max(t.ty.block_bytes())
            })
            .max()
            .unwrap_or(1);
        if (slot_size as u64) < max_block {
            return Err(RuntimeError::Config(format!(
                "staging slot of {} B is smaller than one quant block ({max_block} B)",
                slot_size
            )));
        }
        let factory = self
            .compute
            .clone()
            .or_else(|| gpu.as_ref().map(|g| g.compute.clone()))
            .unwrap_or_else(|| crate::compute::llama::LlamaCompute::factory(Default::default()));

        let zero_copy = backend.computes_from_host() && read_mode == ReadMode::Mmap;
        let needs_upload_ring = !zero_copy
            && (read_mode == ReadMode::Mmap
                || plan
                    .units
                    .iter()
                    .flat_map(|u| &u.tensors)
                    .any(|t| !backend.is_pass_through(t.ty)));
        let cap = |reason_default: usize| self.channel_capacity.unwrap_or(reason_default);
        // Read jobs: the Scheduler keeps at most `2 * readers` units in flight, each split into
        // at most `readers` parts, so its `try_send` never finds this full and it never needs a
        // timer to retry (not shrunk by `channel_capacity` for that reason).
        let (jobs_tx, jobs_rx) = flume::bounded(2 * n_readers * n_readers);
        // One chunk in hand per reader while the next one is read.
        let (chunk_tx, chunk_rx) = flume::bounded(cap(2 * n_readers));
        // Staged chunks hold staging slots; the ring bounds them anyway.
        let (staged_tx, staged_rx) = flume::bounded(cap(staging_slots));
        // One `Loaded` per unit in flight, `Need`/`Done` from one inference thread, and hints.
        let (sched_tx, sched_rx) = flume::bounded(cap(64));
        let (job_tx, job_rx) = flume::bounded(self.queue_capacity);

        let shared = Arc::new(Shared::default());
        // Until the Scheduler has looked at the plan, every `Done` counts.
        shared
            .counters
            .wants_done
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let board = Arc::new(ResidencyBoard::new(plan.units.len()));
        let cancel = CancellationToken::new();
        let map = file.map();
        let dims = plan.unit_dims(&file);

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let fail =
            |threads: Vec<JoinHandle<()>>, cancel: &CancellationToken, board: &ResidencyBoard| {
                cancel.cancel();
                board.close();
                for t in threads {
                    let _ = t.join();
                }
            };
        // First: building the compute (device workspace, the vendor GEMM, tokenizer tables)
        // takes a while and needs none of the other actors, so it overlaps the staging ring's
        // allocation, the other actors' start and the first reads.
        let inference = inference::spawn(inference::InferenceConfig {
            max_sessions: self.max_sessions,
            batch: self.batch,
            compute_threads: self.compute_threads,
            file: file.clone(),
            factory,
            plan: plan.clone(),
            board: board.clone(),
            sched: sched_tx.clone(),
            jobs: job_rx,
            shared: shared.clone(),
            cancel: cancel.clone(),
            source: source.clone(),
        })?;
        macro_rules! start {
            ($e:expr) => {
                match $e {
                    Ok(h) => h,
                    Err(e) => {
                        cancel.cancel();
                        board.close();
                        // The compute's thread ends on the cancellation once it has started.
                        if let Ok(h) = inference.wait() {
                            threads.push(h);
                        }
                        fail(threads, &cancel, &board);
                        return Err(e);
                    }
                }
            };
        }
        // Slot memory comes from the backend: pinned host memory on GPUs, allocated once here.
        let ring =
            |n: usize| StagingRing::with_memory(n, slot_size, |n, b| backend.alloc_staging(n, b));
        let ring_span = tracing::info_span!("staging_ring", slots = staging_slots, slot_size);
        let ring_guard = ring_span.enter();
        let read_ring = start!(ring(if read_mode == ReadMode::Mmap {
            0
        } else {
            staging_slots
        }));
        let upload_ring = start!(ring(if needs_upload_ring { staging_slots } else { 0 }));
        drop(ring_guard);
        threads.push(start!(uploader::spawn(uploader::UploaderConfig {
            path: path.clone(),
            map: map.clone(),
            plan: plan.clone(),
            backend: backend.clone(),
            zero_copy,
            n_streams: self.upload_streams.max(backend.copy_streams()),
            input: staged_rx,
            board: board.clone(),
            sched: sched_tx.clone(),
            shared: shared.clone(),
            cancel: cancel.clone(),
            delay_per_chunk: self.delays.upload_per_chunk,
            dims: dims.clone(),
        })));
        threads.push(start!(transcode::spawn(transcode::TranscodeConfig {
            path: path.clone(),
            n_threads: self.transcode_threads,
            map: map.clone(),
            plan: plan.clone(),
            backend: backend.clone(),
            zero_copy,
            ring: upload_ring.clone(),
            input: chunk_rx,
            out: staged_tx,
            sched: sched_tx.clone(),
            shared: shared.clone(),
            cancel: cancel.clone(),
            delay_per_chunk: self.delays.transcode_per_chunk,
        })));
        let readers = start!(reader::spawn(reader::ReaderConfig {
            source: source.clone(),
            board: board.clone(),
            map,
            mode: read_mode,
            n_readers,
            plan: plan.clone(),
            backend: backend.clone(),
            ring: read_ring.clone(),
            jobs: jobs_rx,
            out: chunk_tx,
            sched: sched_tx.clone(),
            shared: shared.clone(),
            cancel: cancel.clone(),
            delay_per_chunk: self.delays.read_per_chunk,
        }));
        threads.extend(readers);
        threads.push(start!(scheduler::spawn(scheduler::SchedulerConfig {
            plan: plan.clone(),
            budget,
            prefetch_depth: self.prefetch_depth,
            jobs: jobs_tx,
            board: board.clone(),
            shared: shared.clone(),
            cancel: cancel.clone(),
            inbox: sched_rx,
            dims,
            n_readers,
            split_bytes: slot_size as u64,
        })));

        // The compute last: its readiness (the thread started first) is awaited only now.
        let inference = match inference.wait() {
            Ok(h) => h,
            Err(e) => {
                fail(threads, &cancel, &board);
                return Err(e);
            }
        };
        threads.push(inference);
        Ok(RuntimeHandle {
            inner: Arc::new(Inner {
                source,
                file,
                read_mode,
                last_retry: Mutex::new(None),
                sched: sched_tx,
                jobs: Mutex::new(Some(job_tx)),
                shared,
                board,
                cancel,
                threads: Mutex::new(threads),
                backend,
                rings: [read_ring, upload_ring],
                plan,
                budget,
                queue_capacity: self.queue_capacity,
                next_session: AtomicU64::new(0),
                opened: Instant::now(),
            }),
        })
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
