//! `RuntimeBuilder`: what a runtime is built from (model, device, budget, read mode, batching,
//! the actors' geometry) and `build()`, which starts the five actors (see `runtime/mod.rs`).

use super::{Inner, RuntimeHandle};
use crate::compute::ComputeFactory;
use crate::error::{Result, RuntimeError};
use crate::messages::{MemoryBudget, ReadMode};
use crate::pipeline::backend::{CpuBackend, IoGeometry, WeightBackend};
use crate::pipeline::inference;
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::ResidencyBoard;
use crate::pipeline::scheduler::{self, fit_budget};
use crate::pipeline::shared::Shared;
use crate::pipeline::source::ModelSource;
use crate::pipeline::staging::StagingRing;
use crate::pipeline::{reader, transcode, uploader};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Artificial per-unit-of-work delays, to model a slow disk or a slow device in tests and benches.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageDelays {
    pub read_per_chunk: Duration,
    pub transcode_per_chunk: Duration,
    pub upload_per_chunk: Duration,
}

/// How many of the model's last layers a GPU runtime computes on the host
/// (`RuntimeBuilder::host_layers`, the CLI's `--cpu-layers N|fit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLayers {
    Count(usize),
    /// The fewest that leave the device's part within the budget.
    Fit,
}

impl std::str::FromStr for HostLayers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "fit" => Ok(Self::Fit),
            n => n
                .parse()
                .map(Self::Count)
                .map_err(|_| format!("`{s}`: a number of layers or `fit`")),
        }
    }
}

/// Tuning knobs, each with a default that suits every machine; the CLI also takes them from
/// the environment variables of docs/ENVIRONMENT.md (`cli::tuning_from_env`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Bytes one host (CPU) sequence's KV cache and attention scores may take: a context that
    /// does not fit is capped, one of which fewer than `MIN_CTX` tokens fit is refused.
    /// `None` (default): half of the memory available (`KvLimit::host`).
    pub kv_limit: Option<u64>,
    /// Prefill GEMMs on a GPU through the vendor library (cuBLAS) when it loads (default
    /// `true`); `false`: always the portable kernel (to compare the two).
    pub vendor_gemm: bool,
    /// The CPU kernels' instruction-set cap, set for the whole process when the runtime is
    /// built; `None` (default) leaves it as it is (`CpuIsa::Best` unless set before).
    pub cpu_isa: Option<rocmforge::quant::CpuIsa>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            kv_limit: None,
            vendor_gemm: true,
            cpu_isa: None,
        }
    }
}

pub struct RuntimeBuilder {
    model: Option<PathBuf>,
    /// The model opened already (`model_file`): not parsed a second time.
    opened: Option<rocmforge::gguf::GgufFile>,
    backend: Option<Arc<dyn WeightBackend>>,
    budget: MemoryBudget,
    prefetch_depth: usize,
    host_layers: HostLayers,
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
    tuning: Tuning,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self {
            model: None,
            opened: None,
            backend: None,
            budget: MemoryBudget::Unlimited,
            prefetch_depth: 2,
            host_layers: HostLayers::Count(0),
            read_mode: None,
            readers: None,
            transcode_threads: 1,
            staging_slots: None,
            slot_size: None,
            upload_streams: 1,
            queue_capacity: super::DEFAULT_QUEUE_CAPACITY,
            max_sessions: 4,
            batch: Default::default(),
            compute_threads: None,
            channel_capacity: None,
            compute: None,
            delays: StageDelays::default(),
            device: None,
            tuning: Tuning::default(),
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

    /// Threads of the compute's own pool, which the inference actor runs in (CPU backend);
    /// default: one per core.
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
    /// A GPU compute runs the model's last `n` layers on the host (the CPU's forward pass
    /// over the mapped file, its own KV cache for them) while the device runs the others and
    /// the scheduler streams what of those does not fit: the weights of host layers never
    /// cross PCIe, only the step's activations do (twice per run of host layers). Default 0;
    /// nothing to a CPU runtime. `--cpu-layers` on the CLI.
    pub fn host_layers(mut self, n: usize) -> Self {
        self.host_layers = HostLayers::Count(n);
        self
    }
    /// [`Self::host_layers`] with as many layers as it takes for the device's part to fit
    /// the budget (none when the model fits): decode then streams nothing. `--cpu-layers fit`.
    pub fn host_layers_to_fit(mut self) -> Self {
        self.host_layers = HostLayers::Fit;
        self
    }
    /// [`Self::host_layers`] or [`Self::host_layers_to_fit`] as the CLI parses it.
    pub fn host_layers_as(mut self, h: HostLayers) -> Self {
        self.host_layers = h;
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
    /// Every tuning knob at once (see [`Tuning`]; the setters below change one).
    pub fn tuning(mut self, t: Tuning) -> Self {
        self.tuning = t;
        self
    }
    /// Bytes one CPU sequence's KV cache may take (default: half of the memory available);
    /// reaches the compute as `ComputeSettings::kv_limit`.
    pub fn kv_limit(mut self, bytes: u64) -> Self {
        self.tuning.kv_limit = Some(bytes);
        self
    }
    /// `false`: GPU prefill runs the portable GEMM kernel, never cuBLAS (default `true`). Only
    /// a device the builder opens (`device`, `device_with`) applies it; a compute given with
    /// `compute(..)` was configured by its maker.
    pub fn vendor_gemm(mut self, on: bool) -> Self {
        self.tuning.vendor_gemm = on;
        self
    }
    /// Caps the CPU kernels' instruction sets for this process (`rocmforge::quant::set_cpu_isa`,
    /// applied by `build`).
    pub fn cpu_isa(mut self, isa: rocmforge::quant::CpuIsa) -> Self {
        self.tuning.cpu_isa = Some(isa);
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
        if let Some(isa) = self.tuning.cpu_isa {
            rocmforge::quant::set_cpu_isa(isa);
        }
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
            (None, Some((kind, mut opt))) => {
                opt.vendor_gemm &= self.tuning.vendor_gemm;
                crate::compute::gpu::open_pipeline(kind, &file, opt)?
            }
            _ => None,
        };
        let backend: Arc<dyn WeightBackend> = match (&self.backend, &gpu) {
            (Some(b), _) => b.clone(),
            (None, Some(g)) => g.backend.clone(),
            (None, None) => Arc::new(CpuBackend::new()),
        };
        let whole = LoadPlan::new(&file, &*backend)?;
        // What the caller set wins; the rest is the backend's suggestion (a GPU reads with many
        // threads straight into pinned slots, the CPU maps the file).
        let io = backend.io_geometry();
        let read_mode = self.read_mode.unwrap_or(io.read_mode);
        // The CPU's suggestion is for mapping the file; told to read it, it streams through
        // the ring instead (GPU backends make their own suggestion and never compute from host).
        let io = if backend.computes_from_host() && read_mode != ReadMode::Mmap {
            let largest = whole.units.iter().map(|u| u.dev_bytes).max().unwrap_or(0);
            IoGeometry::cpu_streaming(read_mode, largest)
        } else {
            io
        };
        let n_readers = self.readers.unwrap_or(io.readers).max(1);
        let staging_slots = self.staging_slots.unwrap_or(io.staging_slots).max(1);
        let slot_size = self.slot_size.unwrap_or(io.slot_size);
        let total = whole.total_dev_bytes();
        // A GPU compute's host layers (the last ones) keep no device weights; the budget is
        // still a share of all of them. A CPU computes every layer from the host anyway.
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
        let n = whole.n_layers;
        let host_layers = match self.host_layers {
            _ if backend.computes_from_host() => 0,
            HostLayers::Count(k) => k.min(n),
            // The fewest trailing layers that leave the device part within the budget (decode
            // then streams nothing over PCIe); all of them when even that is not enough.
            HostLayers::Fit => {
                let (mut k, mut device) = (0, total);
                while device > budget && k < n {
                    k += 1;
                    device -= whole.units[n - k].dev_bytes;
                }
                k
            }
        };
        let plan = whole.place_on_host(n - host_layers..n);
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
            settings: crate::compute::ComputeSettings {
                kv_limit: self.tuning.kv_limit,
                host_layers,
            },
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
                prefetch_depth: self.prefetch_depth,
                queue_capacity: self.queue_capacity,
                next_session: AtomicU64::new(0),
                opened: Instant::now(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::HostLayers;

    #[test]
    fn cpu_layers_parse_as_a_count_or_fit() {
        assert_eq!("12".parse(), Ok(HostLayers::Count(12)));
        assert_eq!(" fit ".parse(), Ok(HostLayers::Fit));
        assert!("half".parse::<HostLayers>().is_err());
        assert!("-1".parse::<HostLayers>().is_err());
    }
}
