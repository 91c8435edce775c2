//! The one way the CLI opens a model: the runtime (the five actors) on the chosen backend, with
//! the model's tokenizer beside it. `run`, `chat` and `bench` all come through here.

use super::run::{GenError, ModelArgs};
use crate::trace::{enable_chrome_trace, TraceGuard};
use crate::{MemoryBudget, ReadMode, Runtime, RuntimeHandle};
use rocmforge::backend::{Backend, BackendKind, Fallback};
use rocmforge::gguf::GgufFile;
use rocmforge::model::SequenceConfig;
use rocmforge::tokenizer::Tokenizer;
use std::path::PathBuf;

/// How the runtime loads and streams weights (flattened into `run`, `chat` and `bench`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EngineArgs {
    /// Weight memory budget: `2GiB`, `512MiB`, `40%` (of the weights), `unlimited`.
    /// Layers that do not fit are streamed.
    #[arg(long)]
    pub memory_budget: Option<MemoryBudget>,
    /// How the disk reader gets bytes: `mmap`, `read` (buffered) or `direct` (O_DIRECT).
    #[arg(long)]
    pub read_mode: Option<ReadMode>,
    /// Layers requested ahead of the one computing.
    #[arg(long)]
    pub prefetch_depth: Option<usize>,
    /// GPU backends: compute the model's last N layers on the CPU from host memory (their
    /// weights never cross PCIe) while the GPU runs the rest, streaming what of it does not
    /// fit `--memory-budget`; `fit`: as many as it takes for the GPU's part to fit the budget.
    /// Speeds up decode under a budget; prompts run those layers on the CPU too.
    #[arg(long)]
    pub cpu_layers: Option<crate::HostLayers>,
    /// Print where each part of the model lives under the budget (resident, streamed each
    /// token, experts loaded when routed, computed on the CPU) to stderr at start, and on the
    /// CPU backend the decode rate expected from rates measured then (the decode product on
    /// the model's main weight type, the reader over the file).
    #[arg(long)]
    pub explain: bool,
    /// Write a Chrome/Perfetto trace of the pipeline here (view it with `rocmforge trace view`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Tuning: disk reader threads (default: the backend's choice, 12 on a 16-core GPU host).
    #[arg(long, help_heading = "Tuning")]
    pub io_readers: Option<usize>,
    /// Tuning: staging slots and their size in KiB, as `SLOTSxKIB` (default: the backend's
    /// choice; GPUs: 2 per reader + 4, of 4096 KiB).
    #[arg(long, help_heading = "Tuning", value_parser = parse_staging)]
    pub io_staging: Option<(usize, usize)>,
    /// Sequences one step may run (the runtime's `max_num_seqs`; the GPU compute's batch);
    /// not a flag: `bench --parallel` sets it to its largest level.
    #[arg(skip)]
    pub max_seqs: Option<usize>,
}

/// `SLOTSxKIB`, e.g. `28x4096`.
fn parse_staging(s: &str) -> Result<(usize, usize), String> {
    let (n, kib) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}`: expected SLOTSxKIB, e.g. 28x4096"))?;
    let n: usize = n.trim().parse().map_err(|e| format!("slots `{n}`: {e}"))?;
    let kib: usize = kib
        .trim()
        .parse()
        .map_err(|e| format!("KiB `{kib}`: {e}"))?;
    if n == 0 || kib == 0 || kib > (1 << 20) {
        return Err(format!(
            "`{s}`: slots and KiB must be positive (KiB at most 1048576)"
        ));
    }
    Ok((n, kib << 10))
}

impl EngineArgs {
    /// Whether any of these was given (then even a CUDA `run`/`bench` goes through the
    /// runtime instead of the direct loader).
    pub fn any_set(&self) -> bool {
        self.memory_budget.is_some()
            || self.read_mode.is_some()
            || self.prefetch_depth.is_some()
            || self.cpu_layers.is_some()
            || self.trace.is_some()
            || self.io_readers.is_some()
            || self.io_staging.is_some()
    }
}

/// An opened model: the runtime, its tokenizer, and the trace being recorded (if asked).
pub struct Engine {
    pub rt: RuntimeHandle,
    pub tokenizer: Tokenizer,
    /// The backend that opened (`auto` resolved).
    pub backend: BackendKind,
    trace: Option<(TraceGuard, PathBuf)>,
}

impl Engine {
    /// Opens `model` on `backend` through the runtime. The trace subscriber (if any) is
    /// installed first, so the actors' spans from the very start are recorded.
    /// `one_shot`: the command answers one request and exits (`run`): the runtime then leaves
    /// lazy set-up to the request that needs it (`GpuPipelineOptions::idle_gemm_open`).
    pub fn open(
        model: &ModelArgs,
        backend: BackendKind,
        e: &EngineArgs,
        one_shot: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let tuning = super::tuning_from_env()?;
        let trace = match &e.trace {
            Some(path) => Some((enable_chrome_trace(path)?, path.clone())),
            None => None,
        };
        // The driver's initialisation (~0.2 s for CUDA) runs on its own thread while this one
        // parses the model and builds the tokenizer.
        let device = (backend != BackendKind::Cpu).then(|| {
            std::thread::Builder::new()
                .name("rf-device-open".into())
                .spawn(move || {
                    tracing::info_span!("device_open").in_scope(|| Backend::open(backend))
                })
        });
        // Meanwhile a third thread faults in the staging ring's host memory (no driver needed),
        // so the GPU backend only registers it once the device is open. The geometry is the GPU
        // default unless the flags chose theirs.
        let gpu_likely = match backend {
            BackendKind::Cpu => false,
            BackendKind::Cuda | BackendKind::Hip => true,
            BackendKind::Auto => {
                rocmforge::backend::cuda::driver_present() || cfg!(feature = "hip")
            }
        };
        let staging = gpu_likely.then(|| {
            let io = crate::pipeline::gpu::default_io_geometry();
            let (slots, slot_bytes) = e.io_staging.unwrap_or((io.staging_slots, io.slot_size));
            std::thread::Builder::new()
                .name("rf-staging-fault".into())
                .spawn(move || {
                    let _s = tracing::info_span!("staging_fault").entered();
                    let bytes = slots.saturating_mul(slot_bytes.div_ceil(4096) * 4096);
                    rocmforge::backend::host::HostRegion::new(bytes).map(|region| {
                        crate::compute::gpu::EarlyStaging {
                            region,
                            slots,
                            slot_bytes,
                        }
                    })
                })
        });
        let path = &model.model;
        // A cold start: the disk starts on the weights now rather than when the readers do,
        // after the driver's initialisation (the direct mode's reads bypass the page cache).
        if gpu_likely && e.read_mode != Some(ReadMode::Direct) {
            let p = path.clone();
            let _ = std::thread::Builder::new()
                .name("rf-early-readahead".into())
                .spawn(move || {
                    let _s = tracing::info_span!("early_readahead").entered();
                    crate::pipeline::reader::early_readahead(
                        &p,
                        crate::pipeline::reader::EARLY_READAHEAD_BYTES,
                    )
                });
        }
        let parse_span = tracing::info_span!("parse_model").entered();
        let file = GgufFile::open(path).map_err(|e| format!("model {}: {e}", path.display()))?;
        // The architecture first: "unsupported architecture" says more than a tokenizer key
        // such a file also lacks.
        rocmforge::model::HParams::try_from(file.metadata()).map_err(|source| GenError::Model {
            path: path.clone(),
            source,
        })?;
        let tokenizer =
            Tokenizer::from_metadata(file.metadata()).map_err(|source| GenError::Tokenizer {
                path: path.clone(),
                source,
            })?;
        drop(parse_span);
        // cuda/hip: the GPU weight backend and compute (docs/GPU-BACKEND.md); auto: a GPU if
        // one opens, else the CPU.
        let gpu_opt = crate::compute::gpu::GpuPipelineOptions {
            ctx: model.ctx,
            vendor_gemm: tuning.vendor_gemm,
            precision: model.precision,
            idle_gemm_open: !one_shot,
            // One request, then the process ends: no later prompt could use a snapshot, and
            // the default weight budget keeps the cache's reserve for the weights.
            prefix_cache_bytes: if one_shot {
                0
            } else {
                crate::compute::gpu::DEFAULT_PREFIX_CACHE_BYTES
            },
            ..Default::default()
        };
        // One request (`run`): one sequence's step buffers, and a KV pool of one context (the
        // pool is allocated whole, for every sequence a step may carry).
        let default_seqs = if one_shot { 1 } else { gpu_opt.max_seqs };
        let gpu_opt = crate::compute::gpu::GpuPipelineOptions {
            max_seqs: e.max_seqs.unwrap_or(default_seqs),
            ..gpu_opt
        };
        let opened = match tracing::info_span!("device_wait")
            .in_scope(|| device.map(|t| t.map(|h| h.join())))
        {
            Some(joined) => joined?.map_err(|_| "the device-opening thread panicked")??,
            None => (Backend::Cpu, Fallback::default()),
        };
        // A failed early fault only means the backend allocates its ring later.
        let staging = staging
            .and_then(|t| t.ok())
            .and_then(|h| h.join().ok())
            .and_then(|r| r.ok());
        let gpu = tracing::info_span!("open_pipeline")
            .in_scope(|| crate::compute::gpu::open_pipeline_on(opened, &file, gpu_opt, staging))?;
        // What `--explain`'s expected rate measures, taken before the builder owns the file.
        let probe = e.explain.then(|| ExplainProbe::of(&file));
        let mut builder = Runtime::builder().model_file(file).tuning(tuning);
        let opened = match gpu {
            Some(g) => {
                for reason in &g.fallback {
                    tracing::info!("auto skipped a backend: {reason}");
                }
                let kind = g.kind;
                builder = builder.backend(g.backend).compute(g.compute);
                kind
            }
            // The CPU compute honours --ctx, --precision (`exact` is the oracle GPUs match)
            // and --threads.
            None => {
                builder = builder.compute(crate::compute::llama::LlamaCompute::factory(
                    SequenceConfig {
                        ctx: Some(model.ctx),
                        precision: model.precision,
                        kv_type: None,
                    },
                ));
                if let Some(n) = model.threads {
                    builder = builder.compute_threads(n);
                }
                BackendKind::Cpu
            }
        };
        if let Some(b) = e.memory_budget {
            builder = builder.memory_budget(b);
        }
        if let Some(m) = e.read_mode {
            builder = builder.read_mode(m);
        }
        if let Some(k) = e.prefetch_depth {
            builder = builder.prefetch_depth(k);
        }
        if let Some(h) = e.cpu_layers {
            builder = builder.host_layers_as(h);
        }
        if let Some(n) = e.io_readers {
            builder = builder.readers(n);
        }
        if let Some((slots, bytes)) = e.io_staging {
            builder = builder.staging(slots, bytes);
        }
        if let Some(n) = e.max_seqs {
            // A burst of that many requests (bench --parallel) must all be taken.
            builder = builder
                .max_num_seqs(n)
                .queue_capacity(n.max(crate::runtime::DEFAULT_QUEUE_CAPACITY));
        }
        let rt = builder.build()?;
        if e.explain {
            let placement = rt.placement();
            eprintln!("{placement}");
            if let Some(probe) = &probe {
                eprintln!(
                    "{}",
                    probe.expected_line(
                        &placement,
                        opened,
                        path,
                        e.read_mode.unwrap_or_default(),
                        e.io_readers
                            .unwrap_or(crate::pipeline::backend::IoGeometry::default().readers),
                    )
                );
            }
        }
        Ok(Self {
            rt,
            tokenizer,
            backend: opened,
            trace,
        })
    }

    /// For a command that exits right after: writes the trace if one is being recorded (that
    /// needs the actors stopped, so it takes the full `finish`), and otherwise leaves the
    /// runtime to the process exit. Freeing gigabytes of device memory, the pinned ring and the
    /// KV cache piece by piece costs a one-shot `run` a noticeable share of its wall time; the
    /// OS and the driver reclaim all of it when the process ends.
    pub fn finish_at_exit(self) -> Result<Option<PathBuf>, Box<dyn std::error::Error>> {
        if self.trace.is_some() {
            return self.finish();
        }
        std::mem::forget(self);
        Ok(None)
    }

    /// Ends a one-shot command's process at once, output flushed, when it ran on a GPU and
    /// records no trace: the C library's exit handlers would tear the driver's context down
    /// piece by piece (device memory, registered host memory, modules; ~0.1 s on an H100 for an
    /// 8B model), which the driver does at once for a process that ends. On the CPU (or with a
    /// trace to write) this returns and the command ends normally.
    pub fn exit_if_gpu(backend: BackendKind, trace_pending: bool) {
        if backend == BackendKind::Cpu || trace_pending {
            return;
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: `_exit` ends the process without running exit handlers; every output stream
        // of ours was flushed just above and nothing else is pending (the runtime's threads hold
        // no data that must reach a file: the trace case returned above).
        unsafe { libc::_exit(0) }
    }

    /// Stops the actors and writes the trace (if one was recorded); returns its path.
    pub fn finish(self) -> Result<Option<PathBuf>, Box<dyn std::error::Error>> {
        self.rt.shutdown()?;
        match self.trace {
            Some((guard, path)) => {
                guard.finish()?;
                Ok(Some(path))
            }
            None => Ok(None),
        }
    }
}

/// What `--explain`'s expected decode rate measures: the model file (a cheap clone of the
/// mapping, taken before the builder owns the file).
struct ExplainProbe {
    file: GgufFile,
}

impl ExplainProbe {
    fn of(file: &GgufFile) -> Self {
        Self { file: file.clone() }
    }

    /// The expected decode rate: on the CPU backend from two rates measured now (the decode
    /// product on the model's main weight type, [`cpu_product_rate`], and the reader's mode
    /// over up to 32 MiB of the file with `readers` threads); GPU backends say they are not
    /// estimated yet.
    fn expected_line(
        &self,
        placement: &crate::runtime::Placement,
        backend: BackendKind,
        path: &std::path::Path,
        mode: ReadMode,
        readers: usize,
    ) -> String {
        if backend != BackendKind::Cpu {
            return "expected decode: not estimated on GPU backends yet (PCIe and device rates are not measured at start)".into();
        }
        let Some((ty, rate)) = cpu_product_rate(&self.file) else {
            return "expected decode: not estimated (no layer matrices to measure)".into();
        };
        // Nothing streamed: no read to measure.
        let streams = placement.bytes_in(crate::runtime::Place::Streamed) > 0;
        let data = self.file.data_offset();
        let len = (self.file.bytes().len() as u64)
            .saturating_sub(data)
            .min(if streams { 32 << 20 } else { 0 });
        let readers = readers.max(1) as u64;
        let share = len / readers;
        let t0 = std::time::Instant::now();
        let read: usize = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..readers)
                .map(|i| {
                    sc.spawn(move || {
                        crate::pipeline::reader::read_span(
                            path,
                            mode,
                            data + i * share,
                            share as usize,
                        )
                        .unwrap_or(0)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let stream = read as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let e = placement.expected_decode(crate::runtime::Rates {
            compute: rate,
            stream,
        });
        format!(
            "expected decode: ~{:.0} tok/s (per token: products {:.1} ms at {:.1} GB/s, measured on {ty}; streaming {:.1} ms at {:.2} GB/s, measured in {mode:?} mode with {readers} reader(s); the longer counts)",
            e.tokens_per_s,
            e.compute_ms,
            rate / 1e9,
            e.stream_ms,
            stream / 1e9
        )
    }
}

/// Bytes per second the CPU's decode product gets through on the type holding most of the
/// file's weights: a 32 MiB matrix of 4,096 columns times a vector, the best of four passes
/// after a warm-up. One large product per pass keeps the pool's fork and join out of the
/// figure. How close it comes (SmolLM2 Q4_1, 2 cores, 3 runs each): resident, 301-347 expected
/// against 270-290 measured (the products alone: attention, norms and sampling are not
/// counted); at a 40% budget streaming decides: `direct` 11-12 against 15-18 (the runtime's
/// readers keep more reads in flight than this probe), `mmap` 49-76 against 68-80.
fn cpu_product_rate(file: &GgufFile) -> Option<(rocmforge::quant::GgmlType, f64)> {
    let mut by_type: Vec<(rocmforge::quant::GgmlType, u64)> = Vec::new();
    for t in file.tensors().iter().filter(|t| t.shape.len() >= 2) {
        match by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, b)) => *b += t.n_bytes,
            None => by_type.push((t.ggml_type, t.n_bytes)),
        }
    }
    let ty = by_type.iter().max_by_key(|(_, b)| *b)?.0;
    let cols = 4096usize;
    let row = ty.row_bytes(cols as u64)? as usize;
    let rows = ((32usize << 20) / row).max(1);
    // Written, not calloc'd zeros: untouched pages would all read the one zero page (from
    // cache). 0x11 bytes are finite scales in every block type.
    let w = vec![0x11u8; rows * row];
    let x = vec![0.5f32; cols];
    let mut y = vec![0f32; rows];
    let mut best = f64::INFINITY;
    for pass in 0..5 {
        let t0 = std::time::Instant::now();
        rocmforge::quant::matvec(ty, &w, rows, cols, &x, &mut y).ok()?;
        if pass > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    (best > 0.0).then(|| (ty, w.len() as f64 / best))
}
