//! The one way the CLI opens a model: the runtime (the five actors) on the chosen backend, with
//! the model's tokenizer beside it. `run`, `chat` and `bench` all come through here.

use super::run::{GenError, ModelArgs};
use crate::trace::{enable_chrome_trace, TraceGuard};
use crate::{MemoryBudget, ReadMode, Runtime, RuntimeHandle};
use rocmforge::backend::BackendKind;
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
    /// Write a Chrome/Perfetto trace of the pipeline here (view it with `rocmforge trace view`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

impl EngineArgs {
    /// Whether any of these was given (then even a CUDA `run`/`bench` goes through the
    /// runtime instead of the direct loader).
    pub fn any_set(&self) -> bool {
        self.memory_budget.is_some()
            || self.read_mode.is_some()
            || self.prefetch_depth.is_some()
            || self.trace.is_some()
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
    pub fn open(
        model: &ModelArgs,
        backend: BackendKind,
        e: &EngineArgs,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let trace = match &e.trace {
            Some(path) => Some((enable_chrome_trace(path)?, path.clone())),
            None => None,
        };
        let path = &model.model;
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
        // cuda/hip: the GPU weight backend and compute (docs/GPU-BACKEND.md); auto: a GPU if
        // one opens, else the CPU.
        let gpu_opt = crate::compute::gpu::GpuPipelineOptions {
            ctx: model.ctx,
            ..Default::default()
        };
        let gpu = crate::compute::gpu::open_pipeline(backend, &file, gpu_opt)?;
        drop(file);
        let mut builder = Runtime::builder().model(path);
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
        Ok(Self {
            rt: builder.build()?,
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
