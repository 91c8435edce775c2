//! `rocmforge bench`: prompt-processing (pp) and decode (tg) throughput, llama-bench style.
//!
//! pp N: one batched forward over N tokens into an empty cache. tg N: N single-token decode
//! steps from an empty cache. Each test runs once untimed (warm-up: page faults, pool spin-up)
//! and then `-r` times; the reported figure is the median.

use super::run::{build_pool, GenError};
use clap::Args;
use rocmforge::model::{Model, Precision, SequenceConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Path to a GGUF model.
    #[arg(long, short = 'm', default_value = super::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Prompt length of the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    pub n_prompt: usize,
    /// Generated tokens of the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    pub n_gen: usize,
    /// Timed repetitions per test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    #[arg(long, default_value = "fast")]
    pub precision: Precision,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda or auto (CUDA when a driver and device are present, else the CPU).
    #[arg(long, default_value = "auto")]
    pub backend: rocmforge::backend::BackendKind,
    /// CUDA: device bytes for weights (default: free memory minus KV cache and workspace).
    #[arg(long)]
    pub weight_budget: Option<usize>,
    /// Pipelined-runtime bench instead of pp/tg: cold-start time to first token split by stage,
    /// pipelined vs load-then-compute, at each weight budget given as a percentage of the
    /// weights (`--memory-budget 100%,50%,35%`). `-p`/`-n` set the prompt and decode lengths.
    #[arg(long, value_delimiter = ',', value_parser = parse_budget_percent)]
    pub memory_budget: Vec<f64>,
    /// Disk reader mode for `--memory-budget` runs (`read` from a cold page cache is the default).
    #[arg(long, default_value = "read")]
    pub read_mode: crate::ReadMode,
    /// With `--memory-budget`: keep the page cache (by default the model is evicted before each run).
    #[arg(long)]
    pub warm: bool,
    /// With `--memory-budget`: rounds of runs (each budget, both strategies); more than one also
    /// prints medians and how often the pipeline won.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// `"50%"` or `"50"` -> 0.5.
fn parse_budget_percent(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_end_matches('%');
    let p: f64 = t
        .parse()
        .map_err(|_| format!("bad budget {s:?}: give a percentage such as 50%"))?;
    if !(p > 0.0 && p <= 100.0) {
        return Err(format!("budget {s:?} must lie in (0%, 100%]"));
    }
    Ok(p / 100.0)
}

/// The `--memory-budget` bench: the pipelined runtime on the CPU backend.
fn run_ttft(a: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = crate::bench::default_config(&a.model, a.n_prompt, a.n_gen);
    cfg.budgets = a.memory_budget.clone();
    cfg.read_mode = a.read_mode;
    cfg.cold = !a.warm;
    let rounds = crate::bench::run_ttft_repeated(&cfg, a.rounds);
    if a.json {
        let j: Vec<serde_json::Value> = rounds
            .iter()
            .enumerate()
            .flat_map(|(i, rows)| rows.iter().map(move |r| (i, r)))
            .map(|(i, (b, st, r))| match r {
                Ok(r) => serde_json::json!({"test": "ttft", "round": i, "budget_fraction": b, "strategy": st, "row": r}),
                Err(e) => serde_json::json!({"test": "ttft", "round": i, "budget_fraction": b, "strategy": st, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        for (i, rows) in rounds.iter().enumerate() {
            if rounds.len() > 1 {
                println!("round {}:", i + 1);
            }
            print!("{}", crate::bench::format_table(rows));
        }
        if rounds.len() > 1 {
            print!("\n{}", crate::bench::format_medians(&rounds));
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub tokens_per_second: f64,
    pub samples: Vec<f64>,
    pub backend: &'static str,
    pub threads: usize,
    pub model: String,
    pub precision: Precision,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Deterministic, varied token ids (llama-bench uses random tokens: attention cost does not
/// depend on the ids, and the embedding lookup barely does).
pub(crate) fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn pp(model: &Model, cfg: SequenceConfig, n: usize) -> Result<f64, GenError> {
    let toks = tokens(n, model.n_vocab());
    let mut seq = model.new_sequence(cfg)?;
    let t0 = Instant::now();
    model.forward(&toks, &mut seq)?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn tg(model: &Model, cfg: SequenceConfig, n: usize) -> Result<f64, GenError> {
    let toks = tokens(n, model.n_vocab());
    let mut seq = model.new_sequence(cfg)?;
    let t0 = Instant::now();
    for &t in &toks {
        model.forward(&[t], &mut seq)?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

pub fn run(a: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !a.memory_budget.is_empty() {
        if matches!(
            a.backend,
            rocmforge::backend::BackendKind::Cuda | rocmforge::backend::BackendKind::Hip
        ) {
            return Err("--memory-budget runs the pipelined runtime, which has only the CPU backend so far; use --backend cpu (CUDA: --weight-budget)".into());
        }
        return run_ttft(&a);
    }
    let early = super::gpu::open_early(a.backend, &a.model);
    if let Some(dev) = super::gpu::select(a.backend)? {
        return super::gpu::bench(&a, dev, early);
    }
    // `auto` fell back to the CPU: stop the GPU path's start-up work (the early reader would
    // otherwise go on reading the file beside the CPU run).
    drop(early);
    let model = Model::open(&a.model).map_err(|source| GenError::Model {
        path: a.model.clone(),
        source,
    })?;
    let pool = build_pool(a.threads)?;
    let cfg = SequenceConfig {
        ctx: Some((a.n_prompt.max(a.n_gen)).max(1)),
        precision: a.precision,
        kv_type: None,
    };
    let mut results = Vec::new();
    type Test = fn(&Model, SequenceConfig, usize) -> Result<f64, GenError>;
    let tests: [(&str, usize, Test); 2] = [("pp", a.n_prompt, pp), ("tg", a.n_gen, tg)];
    for (name, n, f) in tests {
        if n == 0 {
            continue;
        }
        let samples = pool.install(|| -> Result<Vec<f64>, GenError> {
            f(&model, cfg, n)?;
            (0..a.repetitions.max(1))
                .map(|_| f(&model, cfg, n))
                .collect()
        })?;
        let r = BenchResult {
            test: format!("{name}{n}"),
            tokens_per_second: median(&samples),
            samples,
            backend: "cpu",
            threads: pool.current_num_threads(),
            model: a.model.display().to_string(),
            precision: a.precision,
        };
        if !a.json {
            println!(
                "{:<8} {:>10.2} tok/s  (samples {:?}, cpu, {} threads, {})",
                r.test,
                r.tokens_per_second,
                r.samples
                    .iter()
                    .map(|s| (s * 100.0).round() / 100.0)
                    .collect::<Vec<_>>(),
                r.threads,
                r.model
            );
        }
        results.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}
