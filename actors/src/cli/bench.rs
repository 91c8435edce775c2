//! `rocmforge bench`: prompt-processing (pp) and decode (tg) throughput, llama-bench style.
//!
//! pp N: one batched forward over N tokens into an empty cache. tg N: N single-token decode
//! steps from an empty cache, or with `-d D` after a D-token prompt (`tg128@d4000`: decode at
//! context 4,000; the prompt's prefill is not timed). `--parallel 8,16`: tg N for that many
//! sequences at once (`tg64x8`), the runtime batching their decode steps; the figure is the
//! aggregate rate while all of them decode. Each test runs once untimed (warm-up: page faults,
//! pool spin-up) and then `-r` times; the reported figure is the median.

use super::engine::{Engine, EngineArgs};
use super::run::ModelArgs;
use crate::GenerateRequest;
use clap::Args;
use rocmforge::model::Precision;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Path to a GGUF model.
    #[arg(long, short = 'm', default_value = super::models::DEFAULT_MODEL_FILE, value_parser = super::models::resolve)]
    pub model: PathBuf,
    /// Prompt length of the pp test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    pub n_prompt: usize,
    /// Generated tokens of the tg test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    pub n_gen: usize,
    /// Context depth of the tg test: the decode steps follow an untimed D-token prompt
    /// (llama-bench's `-d`); 0 decodes from an empty cache.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    pub n_depth: usize,
    /// Batched decode: for each level N given (`8,16,32`), also run N tg tests at once (each
    /// its own prompt of `-d` tokens, at least one) and report the aggregate generated tokens
    /// per second while all N decode (`tg64x8`; llama-batched-bench's S_TG). The runtime
    /// then runs up to the largest level per step.
    #[arg(long, value_delimiter = ',')]
    pub parallel: Vec<usize>,
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
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Accepted for old scripts: every bench goes through the runtime's actors.
    #[arg(long, hide = true)]
    pub pipeline: bool,
    /// Instead of pp/tg: cold-start time to first token split by stage, pipelined vs
    /// load-then-compute (CPU), at each weight budget given as a percentage of the weights
    /// (`--ttft 100%,50%,35%`). `-p`/`-n` set the prompt and decode lengths.
    #[arg(long, value_delimiter = ',', value_parser = parse_budget_percent)]
    pub ttft: Vec<f64>,
    /// Disk reader mode of the `--ttft` runs (`read` from a cold page cache is the default).
    #[arg(long, default_value = "read")]
    pub ttft_read_mode: crate::ReadMode,
    /// With `--ttft`: keep the page cache (by default the model is evicted before each run).
    #[arg(long)]
    pub warm: bool,
    /// With `--ttft`: rounds of runs (each budget, both strategies); more than one also
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

/// The `--ttft` bench: the pipelined runtime on the CPU backend.
fn run_ttft(a: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = crate::cli::ttft::default_config(&a.model, a.n_prompt, a.n_gen);
    cfg.budgets = a.ttft.clone();
    cfg.read_mode = a.ttft_read_mode;
    cfg.cold = !a.warm;
    let rounds = crate::cli::ttft::run_ttft_repeated(&cfg, a.rounds);
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
            print!("{}", crate::cli::ttft::format_table(rows));
        }
        if rounds.len() > 1 {
            print!("\n{}", crate::cli::ttft::format_medians(&rounds));
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub tokens_per_second: f64,
    pub samples: Vec<f64>,
    pub backend: String,
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
/// depend on the ids, and the embedding lookup barely does), starting from another id for each
/// `salt`, so that no run's prompt shares a prefix with an earlier one: the runtime's prefix
/// cache would otherwise serve every run after the first from the KV blocks it kept, and pp
/// would time no prefill at all.
fn salted_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13 + salt * 104_729) % vocab) as u32)
        .collect()
}

/// pp N: an N-token prompt into an empty cache, timed to its first token; run `run` of the
/// test (its prompt shares no prefix with another run's).
fn pp(
    engine: &Engine,
    n: usize,
    vocab: usize,
    run: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut req = GenerateRequest::tokens(salted_tokens(n, vocab, run), 1);
    req.stop_at_eos = false;
    let t0 = Instant::now();
    engine.rt.generate(req).collect_tokens()?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// tg N: N single-token decode steps after a `depth`-token prompt (at least one token), timed
/// between the first generated token (the prompt's prefill done) and the last.
fn tg(
    engine: &Engine,
    n: usize,
    depth: usize,
    vocab: usize,
    run: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut req = GenerateRequest::tokens(salted_tokens(depth.max(1), vocab, run), n + 1);
    req.stop_at_eos = false;
    let mut first = None;
    let mut last = Instant::now();
    for ev in engine.rt.generate(req).into_blocking() {
        ev?;
        last = Instant::now();
        first.get_or_insert(last);
    }
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    Ok(if secs > 0.0 { n as f64 / secs } else { 0.0 })
}

/// tg N for `np` sequences at once: each its own `depth`-token prompt (at least one) and N + 1
/// tokens, every token timestamped. The rate counts the tokens that arrive while all `np`
/// sequences decode (after the last one's first token, up to the first one's last), so the
/// prompts' prefill and the ragged ends stay out of it.
fn tg_parallel(
    engine: &Engine,
    n: usize,
    depth: usize,
    np: usize,
    vocab: usize,
    run: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let streams: Vec<_> = (0..np)
        .map(|i| {
            let mut req =
                GenerateRequest::tokens(salted_tokens(depth.max(1), vocab, run * np + i), n + 1);
            req.stop_at_eos = false;
            engine.rt.generate(req).into_blocking()
        })
        .collect();
    let stamps = std::thread::scope(|sc| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|st| {
                sc.spawn(move || -> Result<Vec<Instant>, String> {
                    let mut ts = Vec::new();
                    for ev in st {
                        ev.map_err(|e| e.to_string())?;
                        ts.push(Instant::now());
                    }
                    Ok(ts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a bench stream thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    Ok(steady_rate(&stamps))
}

/// Tokens per second over the window in which every sequence of `stamps` (each its tokens'
/// arrival times) was decoding: from the latest first token to the earliest last one, counting
/// the tokens inside it. Where the sequences never all decoded at once (they ran one after
/// another), every token after each sequence's first over the whole span instead.
fn steady_rate(stamps: &[Vec<Instant>]) -> f64 {
    let firsts = stamps.iter().filter_map(|t| t.first());
    let lasts = stamps.iter().filter_map(|t| t.last());
    let (Some(start), Some(end)) = (firsts.clone().max(), lasts.clone().min()) else {
        return 0.0;
    };
    if end > start {
        let tokens: usize = stamps
            .iter()
            .map(|t| t.iter().filter(|&&x| x > *start && x <= *end).count())
            .sum();
        return tokens as f64 / (*end - *start).as_secs_f64();
    }
    let (Some(a), Some(b)) = (firsts.min(), lasts.max()) else {
        return 0.0;
    };
    let tokens: usize = stamps.iter().map(|t| t.len().saturating_sub(1)).sum();
    let secs = (*b - *a).as_secs_f64();
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

pub fn run(a: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !a.ttft.is_empty() {
        if matches!(
            a.backend,
            rocmforge::backend::BackendKind::Cuda | rocmforge::backend::BackendKind::Hip
        ) {
            return Err("--ttft compares pipelined and load-then-compute on the CPU backend; use --backend cpu".into());
        }
        return run_ttft(&a);
    }
    let backend = a.backend;
    let model = ModelArgs {
        model: a.model.clone(),
        ctx: a.n_prompt.max(a.n_depth.max(1) + a.n_gen + 1).max(16),
        precision: a.precision,
        threads: a.threads,
    };
    if a.parallel.contains(&0) {
        return Err("--parallel levels must be at least 1".into());
    }
    let mut engine_args = a.engine.clone();
    if let Some(&most) = a.parallel.iter().max() {
        engine_args.max_seqs = Some(most.max(crate::pipeline::batch::DEFAULT_MAX_NUM_SEQS));
    }
    let engine = Engine::open(&model, backend, &engine_args, false)?;
    let vocab = engine.tokenizer.vocab_size();
    let threads = match engine.backend {
        rocmforge::backend::BackendKind::Cpu => a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        _ => 1,
    };
    let mut results = Vec::new();
    // (name, tokens, depth, sequences at once: None for the one-sequence tests)
    let mut tests = vec![
        ("pp", a.n_prompt, 0, None),
        ("tg", a.n_gen, a.n_depth, None),
    ];
    tests.extend(
        a.parallel
            .iter()
            .map(|&np| ("tg", a.n_gen, a.n_depth, Some(np))),
    );
    for (name, n, depth, np) in tests {
        if n == 0 {
            continue;
        }
        let f = |run: usize| match (name, np) {
            ("pp", _) => pp(&engine, n, vocab, run),
            (_, None) => tg(&engine, n, depth, vocab, run),
            (_, Some(np)) => tg_parallel(&engine, n, depth, np, vocab, run),
        };
        // One untimed run first (page faults, pool spin-up, the load itself).
        f(0)?;
        let samples = (1..=a.repetitions.max(1))
            .map(f)
            .collect::<Result<Vec<f64>, _>>()?;
        let batch = np.map(|np| format!("x{np}")).unwrap_or_default();
        let r = BenchResult {
            test: if depth > 0 {
                format!("{name}{n}{batch}@d{depth}")
            } else {
                format!("{name}{n}{batch}")
            },
            tokens_per_second: median(&samples),
            samples,
            backend: engine.backend.to_string(),
            threads,
            model: a.model.display().to_string(),
            precision: a.precision,
        };
        if !a.json {
            println!(
                "{:<8} {:>10.2} tok/s  (samples {:?}, {}, {} threads, {})",
                r.test,
                r.tokens_per_second,
                r.samples
                    .iter()
                    .map(|s| (s * 100.0).round() / 100.0)
                    .collect::<Vec<_>>(),
                r.backend,
                r.threads,
                r.model
            );
        }
        results.push(r);
    }
    let opened = engine.backend;
    let trace = engine.finish_at_exit()?;
    if a.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Engine::exit_if_gpu(opened, trace.is_some());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::steady_rate;
    use std::time::{Duration, Instant};

    fn at(t0: Instant, ms: &[u64]) -> Vec<Instant> {
        ms.iter().map(|&m| t0 + Duration::from_millis(m)).collect()
    }

    #[test]
    fn steady_rate_counts_only_while_all_decode() {
        let t0 = Instant::now();
        // Window 100..400 ms: a has 200, 300, 400; b has 200, 300 (its 100 is the start).
        let s = [
            at(t0, &[0, 200, 300, 400, 500]),
            at(t0, &[100, 200, 300, 400]),
        ];
        let r = steady_rate(&s);
        assert!((r - 6.0 / 0.3).abs() < 1e-6, "{r}");
    }

    #[test]
    fn steady_rate_of_sequences_one_after_another_spans_them_all() {
        let t0 = Instant::now();
        let s = [at(t0, &[0, 100, 200]), at(t0, &[300, 400])];
        let r = steady_rate(&s);
        assert!((r - 3.0 / 0.4).abs() < 1e-6, "{r}");
        assert_eq!(steady_rate(&[]), 0.0);
    }
}
