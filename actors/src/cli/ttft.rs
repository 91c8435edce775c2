//! Time-to-first-token from a cold start (`open` to first token), split by stage, at several
//! memory budgets; pipelined versus "load everything, then compute", measured in the same run.
//! The `rocmforge bench` command calls `run_ttft_bench` and prints `format_table`.
//!
//! Cold start: before each run the model file's pages are evicted from the page cache with
//! `posix_fadvise(POSIX_FADV_DONTNEED)` (no root needed; works for clean pages that no process
//! has mapped). The system-wide `drop_caches` is deliberately not used: it needs root and makes
//! every other process on the machine re-read its files. `mincore` then measures how much of the
//! file is still cached, and the report says so per row ("cached before").
//!
//! Single cold runs on a shared machine are noisy, so `run_ttft_repeated` alternates which
//! strategy goes first and `format_medians` reports medians and how often the pipeline won
//! within a pair (same budget, same repetition).

use crate::compute::ComputeFactory;
use crate::error::{Result, RuntimeError};
use crate::messages::{GenerateRequest, MemoryBudget, ReadMode, Stage};
use crate::runtime::Runtime;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct BenchConfig {
    pub model: PathBuf,
    /// Fractions of the weights, e.g. `[1.0, 0.5, 0.25]`.
    pub budgets: Vec<f64>,
    pub read_mode: ReadMode,
    pub prompt: Vec<u32>,
    pub decode_tokens: usize,
    pub prefetch_depth: usize,
    pub readers: usize,
    pub compute: ComputeFactory,
    /// Evict the model from the page cache before each run.
    pub cold: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Compute starts as soon as layer 0 is resident.
    Pipelined,
    /// Wait for the whole initial load, then compute.
    LoadThenCompute,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TtftRow {
    pub budget_fraction: f64,
    pub budget_bytes: u64,
    pub read_mode: ReadMode,
    pub strategy: Strategy,
    /// Fraction of the model file in the page cache right before the run (0 = cold).
    pub cached_before: f64,
    pub open_ms: f64,
    /// Load-then-compute only: time waiting, after `build()`, for the initial load to finish
    /// (the most the pipeline can save, before it pays for the overlap); 0 for pipelined runs.
    #[serde(default)]
    pub load_wait_ms: f64,
    /// Open to first token.
    pub ttft_ms: f64,
    /// Busy time per stage until the first token (summed over the stage's threads).
    pub read_ms: f64,
    pub transcode_ms: f64,
    pub upload_ms: f64,
    pub compute_ms: f64,
    pub decode_tokens_per_s: f64,
    pub peak_resident_bytes: u64,
    pub misses: u64,
    /// Tokens generated (identical across rows for the same prompt: checked by the caller).
    pub tokens: Vec<u32>,
}

/// Fraction of `path`'s pages resident in the page cache (`mincore`).
pub fn page_cache_fraction(path: &Path) -> Result<f64> {
    let file = std::fs::File::open(path).map_err(|source| RuntimeError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file.metadata().map_or(0, |m| m.len());
    crate::pipeline::reader::cached_fraction(&file, len).map_err(|source| RuntimeError::Read {
        path: path.to_path_buf(),
        offset: 0,
        len: len as usize,
        source,
    })
}

/// Evicts the file's pages from the page cache (after flushing any dirty ones, which
/// `DONTNEED` would skip). Returns the fraction still cached afterwards.
pub fn evict_from_page_cache(path: &Path) -> Result<f64> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).map_err(|source| RuntimeError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: plain syscalls on a file descriptor we own.
    unsafe {
        libc::fdatasync(file.as_raw_fd());
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    page_cache_fraction(path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One cold run: open, generate, measure.
pub fn run_once(cfg: &BenchConfig, budget: f64, strategy: Strategy) -> Result<TtftRow> {
    let cached_before = if cfg.cold {
        evict_from_page_cache(&cfg.model)?
    } else {
        page_cache_fraction(&cfg.model)?
    };
    let t0 = Instant::now();
    let rt = Runtime::builder()
        .model(&cfg.model)
        .memory_budget(if budget >= 1.0 {
            MemoryBudget::Unlimited
        } else {
            MemoryBudget::FractionOfWeights(budget)
        })
        .read_mode(cfg.read_mode)
        .prefetch_depth(cfg.prefetch_depth)
        .readers(cfg.readers)
        .compute(cfg.compute.clone())
        .build()?;
    let open = t0.elapsed();
    let t_wait = Instant::now();
    if strategy == Strategy::LoadThenCompute {
        rt.wait_loaded(Duration::from_secs(600))?;
    }
    let load_wait = t_wait.elapsed();
    let mut req = GenerateRequest::tokens(cfg.prompt.clone(), cfg.decode_tokens.max(1));
    req.stop_at_eos = false;
    let mut it = rt.generate(req).into_blocking();
    let first = it.next().ok_or(RuntimeError::Cancelled)??;
    let ttft = t0.elapsed();
    let at_first = rt.stats();
    let t_dec = Instant::now();
    let mut tokens = vec![first.token];
    for ev in it {
        tokens.push(ev?.token);
    }
    let dec = t_dec.elapsed();
    let stats = rt.stats();
    rt.shutdown()?;
    let busy = |s: Stage| at_first.busy_ns(s) as f64 / 1e6;
    Ok(TtftRow {
        budget_fraction: budget,
        budget_bytes: stats.budget_bytes.min(stats.total_weight_bytes),
        read_mode: cfg.read_mode,
        strategy,
        cached_before,
        open_ms: ms(open),
        load_wait_ms: if strategy == Strategy::LoadThenCompute {
            ms(load_wait)
        } else {
            0.0
        },
        ttft_ms: ms(ttft),
        read_ms: busy(Stage::Read),
        transcode_ms: busy(Stage::Transcode),
        upload_ms: busy(Stage::Upload),
        compute_ms: busy(Stage::Compute),
        decode_tokens_per_s: if tokens.len() > 1 {
            (tokens.len() - 1) as f64 / dec.as_secs_f64()
        } else {
            0.0
        },
        peak_resident_bytes: stats.peak_resident_bytes,
        misses: stats.misses,
        tokens,
    })
}

/// One measured run: budget fraction, strategy, result.
pub type BenchOutcome = (f64, Strategy, Result<TtftRow>);

/// Every budget, pipelined and load-then-compute. A budget the model cannot run under is
/// reported as an error row by the caller (`Err` here stops at the first failure).
pub fn run_ttft_bench(cfg: &BenchConfig) -> Vec<BenchOutcome> {
    let mut out = Vec::new();
    for &b in &cfg.budgets {
        for s in [Strategy::LoadThenCompute, Strategy::Pipelined] {
            out.push((b, s, run_once(cfg, b, s)));
        }
    }
    out
}

/// `repeat` rounds of `run_ttft_bench`; odd rounds run the pipelined strategy first, so neither
/// strategy always runs right after the other one's process state (allocator, CPU frequency).
pub fn run_ttft_repeated(cfg: &BenchConfig, repeat: usize) -> Vec<Vec<BenchOutcome>> {
    (0..repeat.max(1))
        .map(|i| {
            let order = if i % 2 == 0 {
                [Strategy::LoadThenCompute, Strategy::Pipelined]
            } else {
                [Strategy::Pipelined, Strategy::LoadThenCompute]
            };
            let mut round = Vec::new();
            for &b in &cfg.budgets {
                let mut pair: Vec<BenchOutcome> =
                    order.iter().map(|&s| (b, s, run_once(cfg, b, s))).collect();
                // Report in a fixed order whatever ran first.
                pair.sort_by_key(|(_, s, _)| *s == Strategy::Pipelined);
                round.extend(pair);
            }
            round
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per budget: median TTFT of both strategies over the rounds, the pipeline's share of wins in
/// paired runs, median decode speed, and whether every row generated the same tokens.
pub fn format_medians(rounds: &[Vec<BenchOutcome>]) -> String {
    let mut s = String::from(
        "| budget | LTC TTFT ms (median) | pipelined TTFT ms (median) | pipelined faster | decode tok/s (LTC / pipelined) | max cached before | runs |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let Some(first) = rounds.first() else {
        return s;
    };
    let mut budgets: Vec<f64> = first.iter().map(|(b, _, _)| *b).collect();
    budgets.dedup();
    for b in budgets {
        let row = |round: &[BenchOutcome], st: Strategy| -> Option<TtftRow> {
            round
                .iter()
                .find(|(rb, rs, _)| *rb == b && *rs == st)
                .and_then(|(_, _, r)| r.as_ref().ok().cloned())
        };
        let (mut lt, mut pt, mut ld, mut pd) = (vec![], vec![], vec![], vec![]);
        let (mut wins, mut pairs, mut cached) = (0, 0, 0f64);
        for round in rounds {
            let (l, p) = (
                row(round, Strategy::LoadThenCompute),
                row(round, Strategy::Pipelined),
            );
            for r in l.iter().chain(p.iter()) {
                cached = cached.max(r.cached_before);
            }
            if let (Some(l), Some(p)) = (&l, &p) {
                pairs += 1;
                wins += usize::from(p.ttft_ms < l.ttft_ms);
            }
            if let Some(l) = l {
                lt.push(l.ttft_ms);
                ld.push(l.decode_tokens_per_s);
            }
            if let Some(p) = p {
                pt.push(p.ttft_ms);
                pd.push(p.decode_tokens_per_s);
            }
        }
        if pairs == 0 {
            s.push_str(&format!(
                "| {:.0}% | error | error | | | | 0 |\n",
                b * 100.0
            ));
            continue;
        }
        s.push_str(&format!(
            "| {:.0}% | {:.1} | {:.1} | {wins} of {pairs} | {:.1} / {:.1} | {:.0}% | {pairs} |\n",
            b * 100.0,
            median(&mut lt),
            median(&mut pt),
            median(&mut ld),
            median(&mut pd),
            cached * 100.0,
        ));
    }
    let tokens: Vec<&Vec<u32>> = rounds
        .iter()
        .flatten()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .map(|r| &r.tokens)
        .collect();
    s.push_str(&format!(
        "\nidentical tokens across all {} rows: {}\n",
        tokens.len(),
        tokens.windows(2).all(|w| w[0] == w[1])
    ));
    s
}

/// A markdown table of the results (what docs/PERFORMANCE.md records).
pub fn format_table(rows: &[BenchOutcome]) -> String {
    let mut s = String::from(
        "| budget | strategy | cached before | TTFT ms | open ms | load wait ms | read ms | transcode ms | upload ms | compute ms | decode tok/s | peak resident MiB | misses |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (b, st, r) in rows {
        match r {
            Ok(r) => s.push_str(&format!(
                "| {:.0}% | {:?} | {:.0}% | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
                b * 100.0,
                st,
                r.cached_before * 100.0,
                r.ttft_ms,
                r.open_ms,
                r.load_wait_ms,
                r.read_ms,
                r.transcode_ms,
                r.upload_ms,
                r.compute_ms,
                r.decode_tokens_per_s,
                r.peak_resident_bytes as f64 / (1 << 20) as f64,
                r.misses
            )),
            Err(e) => s.push_str(&format!("| {:.0}% | {st:?} | error: {e} |\n", b * 100.0)),
        }
    }
    s
}

/// The bench with the llama forward pass: a `prompt_tokens`-long prompt of fixed ids, greedy,
/// `decode_tokens` tokens, budgets 100/50/25 %, `read` mode, two readers, cold page cache.
pub fn default_config(model: &Path, prompt_tokens: usize, decode_tokens: usize) -> BenchConfig {
    BenchConfig {
        model: model.to_path_buf(),
        budgets: vec![1.0, 0.5, 0.25],
        read_mode: ReadMode::Read,
        // Fixed, arbitrary in-vocabulary ids: the prompt's content does not matter for timing.
        prompt: (0..prompt_tokens.max(1) as u32)
            .map(|i| 100 + (i * 37) % 1000)
            .collect(),
        decode_tokens,
        prefetch_depth: 2,
        readers: 2,
        compute: crate::compute::llama::LlamaCompute::factory(Default::default()),
        cold: true,
    }
}
