//! `rocmforge run` through the pipelined runtime (the five actors): chosen with `--pipeline`, or
//! implied by `--memory-budget`, `--read-mode`, `--prefetch-depth` or `--trace`. Same output as
//! the direct path (streamed text, timings on stderr, or `--json`), plus the runtime's stats.

use super::run::{GenError, RunArgs, TextSink};
use crate::progress::LoadProgressBars;
use crate::trace::enable_chrome_trace;
use crate::{GenerateRequest, MemoryBudget, Prompt, ReadMode, Runtime};
use rocmforge::gguf::GgufFile;
use rocmforge::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Options of the pipelined path (flattened into `RunArgs`).
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// Run through the pipelined runtime (reader, transcode, uploader, scheduler, inference).
    #[arg(long)]
    pub pipeline: bool,
    /// Weight memory budget: `2GiB`, `512MiB`, `40%` (of the weights), `unlimited`.
    /// Layers that do not fit are streamed. Implies --pipeline.
    #[arg(long)]
    pub memory_budget: Option<MemoryBudget>,
    /// How the disk reader gets bytes: `mmap`, `read` (buffered) or `direct` (O_DIRECT).
    /// Implies --pipeline.
    #[arg(long)]
    pub read_mode: Option<ReadMode>,
    /// Layers requested ahead of the one computing. Implies --pipeline.
    #[arg(long)]
    pub prefetch_depth: Option<usize>,
    /// Write a Chrome/Perfetto trace of the pipeline here (view it with `rocmforge trace view`).
    /// Implies --pipeline.
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

impl PipelineArgs {
    pub fn wanted(&self) -> bool {
        self.pipeline
            || self.memory_budget.is_some()
            || self.read_mode.is_some()
            || self.prefetch_depth.is_some()
            || self.trace.is_some()
    }
}

pub fn run(a: &RunArgs, prompt: &str) -> Result<(), Box<dyn std::error::Error>> {
    let p = &a.pipeline;
    let started = Instant::now();
    // The trace subscriber must exist before the actors start so their spans are recorded.
    let guard = match &p.trace {
        Some(path) => Some(enable_chrome_trace(path)?),
        None => None,
    };
    let path = &a.model.model;
    let file = GgufFile::open(path).map_err(|e| format!("model {}: {e}", path.display()))?;
    let tok = Tokenizer::from_metadata(file.metadata()).map_err(|source| GenError::Tokenizer {
        path: path.clone(),
        source,
    })?;
    let prompt_ids = tok.encode(prompt, true, true).map_err(GenError::from)?;
    if prompt_ids.is_empty() {
        return Err(GenError::Run(rocmforge::model::ModelError::EmptyPrompt).into());
    }
    // cuda/hip: the GPU weight backend and compute (docs/GPU-BACKEND.md); auto: a GPU if one
    // opens, else the CPU defaults.
    let gpu_opt = crate::gpu_compute::GpuPipelineOptions {
        ctx: a.model.ctx,
        ..Default::default()
    };
    let gpu = crate::gpu_compute::open_pipeline(a.backend, &file, gpu_opt)?;
    drop(file);

    let mut builder = Runtime::builder().model(path);
    builder = match gpu {
        Some(g) => builder.backend(g.backend).compute(g.compute),
        // The CPU compute honours --ctx and --precision (`exact` is the oracle GPUs match).
        None => builder.compute(crate::llama::LlamaCompute::factory(
            rocmforge::model::SequenceConfig {
                ctx: Some(a.model.ctx),
                precision: a.model.precision,
                kv_type: None,
            },
        )),
    };
    if let Some(b) = p.memory_budget {
        builder = builder.memory_budget(b);
    }
    if let Some(m) = p.read_mode {
        builder = builder.read_mode(m);
    }
    if let Some(k) = p.prefetch_depth {
        builder = builder.prefetch_depth(k);
    }
    let rt = builder.build()?;
    let bars = (!a.json).then(|| LoadProgressBars::show(&rt));

    // Every sampling flag reaches the runtime (one `SamplingParams`); stop strings are cut here.
    let sampling = a.sampling.params();
    let seed = sampling.seed;
    tracing::debug!(?seed, "sampling");
    let req = GenerateRequest {
        prompt: Prompt::Tokens(prompt_ids.clone()),
        max_tokens: a.n_predict,
        sampling,
        stop_at_eos: true,
    };
    let mut sink = TextSink::new(&tok, &a.sampling.stop);
    let mut out = std::io::stdout();
    let mut ids = Vec::new();
    let mut first_token_ms = None;
    let mut stream = rt.generate(req).into_blocking();
    let mut stop_string = false;
    for ev in stream.by_ref() {
        let ev = ev?;
        if first_token_ms.is_none() {
            first_token_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        }
        ids.push(ev.token);
        let (piece, stop) = sink.push(ev.token)?;
        if !a.json && !piece.is_empty() {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        if stop {
            stop_string = true;
            break;
        }
    }
    // The same names as the direct path's `StopReason`.
    let stop_reason = match stream.finish_reason() {
        _ if stop_string => "callback",
        Some(crate::FinishReason::EndOfSequence) => "eog",
        Some(crate::FinishReason::ContextFull) => "context",
        Some(crate::FinishReason::MaxTokens) | None => "length",
    };
    drop(stream);
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let stats = rt.stats();
    drop(bars);
    rt.shutdown()?;
    if let Some(g) = guard {
        g.finish()?;
    }
    let tail = sink.finish().to_string();
    if a.json {
        let j = serde_json::json!({
            "seed": seed,
            "stop_reason": stop_reason,
            "prompt_ids": prompt_ids,
            "ids": ids,
            "text": sink.text,
            "timings": {
                "first_token_ms": first_token_ms,
                "total_ms": total_ms,
            },
            "stats": stats,
        });
        serde_json::to_writer(&mut out, &j)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{tail}")?;
        out.flush()?;
        let decode_s = (total_ms - first_token_ms.unwrap_or(total_ms)) / 1e3;
        let n_after_first = ids.len().saturating_sub(1);
        eprintln!(
            "pipeline: first token {:.0} ms after open | {} tokens, decode {:.1} tok/s | peak resident {:.1} MiB | hits {} misses {}",
            first_token_ms.unwrap_or(f64::NAN),
            ids.len(),
            if decode_s > 0.0 { n_after_first as f64 / decode_s } else { 0.0 },
            stats.peak_resident_bytes as f64 / (1u64 << 20) as f64,
            stats.hits,
            stats.misses,
        );
        if let Some(t) = &p.trace {
            eprintln!(
                "trace written to {} (rocmforge trace view {} --svg out.svg)",
                t.display(),
                t.display()
            );
        }
    }
    Ok(())
}
