//! Load generator for `rocmforge serve` on loopback: starts the server in-process, then for each
//! concurrency level runs `clients x rounds` streamed chat requests and reports throughput
//! (generated tokens per second of wall time), p50/p99 time to first token, the median
//! request's mean time between tokens after its first (`itl_p50_ms`: decode alone) and, for an
//! in-process server, the batch steps the level took.
//!
//! cargo run --profile test -p rocmforge-actors --example serve_loadgen -- \
//!     [MODEL] [--clients 1,8,32] [--rounds 2] [--max-tokens 16] [--backend cpu|cuda|auto] [--json]
//!     [--max-num-seqs N] [--max-batch-tokens N] [--prompt-words N] [--addr HOST:PORT]
//!     [--out results.json]
//!
//! `--out` writes every level's numbers and the options as one JSON document.
//! `--prompt-words N` lengthens each request's prompt with N distinct filler words (about one
//! token each: issue 18's 128-token prompts are `--prompt-words 89` with the chat template).
//! `--addr` sends the load to a server already running there (llama.cpp's `llama-server`, or
//! another `rocmforge serve`) instead of starting one in-process; generated tokens are counted
//! from the stream's `usage` when the server reports it, else one per content chunk.
//! `ROCMFORGE_CPU_ISA=avx2` caps the CPU kernels as it does for `rocmforge` (to compare the
//! AVX2 and AVX-512 VNNI kernels with one build).

use rocmforge_actors::serve::client::post_sse;
use rocmforge_actors::serve::{ServeConfig, Server};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(v) = std::env::var_os(rocmforge_actors::cli::CPU_ISA_ENV) {
        let isa = v.to_string_lossy().parse::<rocmforge::quant::CpuIsa>()?;
        rocmforge::quant::set_cpu_isa(isa);
    }
    let mut model = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut levels = vec![1usize, 8, 32];
    let mut rounds = 2usize;
    let mut max_tokens = 16usize;
    let mut as_json = false;
    let mut backend = rocmforge::backend::BackendKind::Cpu;
    let mut batch = rocmforge_actors::pipeline::batch::BatchOptions::default();
    let mut out_path: Option<PathBuf> = None;
    let mut prompt_words = 0usize;
    let mut external: Option<std::net::SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--clients" => {
                levels = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "--rounds" => rounds = val()?.parse()?,
            "--max-tokens" => max_tokens = val()?.parse()?,
            "--json" => as_json = true,
            "--backend" => backend = val()?.parse()?,
            "--max-num-seqs" => batch.max_num_seqs = val()?.parse()?,
            "--max-batch-tokens" => batch.max_batch_tokens = val()?.parse()?,
            "--out" => out_path = Some(PathBuf::from(val()?)),
            "--prompt-words" => prompt_words = val()?.parse()?,
            "--addr" => external = Some(val()?.parse()?),
            _ => model = PathBuf::from(a),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut cfg = ServeConfig::new(&model);
        cfg.port = 0;
        cfg.model_name = Some("bench".into());
        cfg.backend = backend;
        cfg.batch = batch;
        // Every client of the largest level must fit in the queue.
        cfg.queue_capacity = levels.iter().copied().max().unwrap_or(1) + 1;
        let server = match external {
            Some(_) => None,
            None => {
                let s = Server::start(cfg).await?;
                s.wait_ready(Duration::from_secs(300)).await?;
                Some(s)
            }
        };
        let addr = match (&server, external) {
            (Some(s), _) => s.local_addr(),
            (None, Some(a)) => a,
            (None, None) => unreachable!("a server starts unless --addr names one"),
        };
        // An external server is asked which model it serves (the first of /v1/models).
        let model_id = match external {
            None => "bench".to_string(),
            Some(a) => {
                let r = rocmforge_actors::serve::client::request(a, "GET", "/v1/models", None).await?;
                serde_json::from_slice::<serde_json::Value>(&r.body)?["data"][0]["id"]
                    .as_str()
                    .ok_or("the server's /v1/models names no model")?
                    .to_string()
            }
        };
        if !as_json {
            println!(
                "clients  requests  tokens  wall_s  tok/s   ttft_p50_ms  ttft_p99_ms  itl_p50_ms  steps"
            );
        }
        let mut report = Vec::new();
        // An in-process server's step count (continuous batching: one step a decode token for
        // every running sequence, plus prompt chunks).
        let steps = || {
            server
                .as_ref()
                .map(|s| s.runtime().stats().batch_steps.iter().sum::<u64>())
        };
        for (level, &clients) in levels.iter().enumerate() {
            let steps_before = steps();
            let start = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|c| {
                    let model_id = model_id.clone();
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for r in 0..rounds {
                            let body = json!({
                                "model": model_id, "max_tokens": max_tokens, "temperature": 0,
                                "stream": true, "stream_options": {"include_usage": true},
                                "messages": [{"role": "user",
                                              "content": prompt(level, c, r, prompt_words)}],
                            });
                            let sent = Instant::now();
                            let resp = post_sse(addr, "/v1/chat/completions", &body).await?;
                            if resp.status != 200 {
                                return Err(format!(
                                    "status {}: {}",
                                    resp.status,
                                    String::from_utf8_lossy(&resp.raw)
                                )
                                .into());
                            }
                            // Events carrying generated text (the first chunk only announces
                            // the role).
                            let content: Vec<Instant> = resp
                                .events
                                .iter()
                                .filter(|(_, e)| {
                                    serde_json::from_str::<serde_json::Value>(e).is_ok_and(|v| {
                                        v["choices"][0]["delta"]["content"]
                                            .as_str()
                                            .is_some_and(|s| !s.is_empty())
                                    })
                                })
                                .map(|(t, _)| *t)
                                .collect();
                            let ttft = content.first().map(|t| (*t - sent).as_secs_f64());
                            // Mean time between content events after the first (decode
                            // alone, without the prompt's prefill).
                            let itl = match (content.first(), content.last()) {
                                (Some(a), Some(b)) if content.len() > 1 => {
                                    Some((*b - *a).as_secs_f64() / (content.len() - 1) as f64)
                                }
                                _ => None,
                            };
                            let usage = |key: &str| {
                                resp.events.iter().find_map(|(_, e)| {
                                    serde_json::from_str::<serde_json::Value>(e).ok()?["usage"]
                                        [key]
                                        .as_u64()
                                })
                            };
                            let chunks = content.len() as u64;
                            let tokens = usage("completion_tokens").unwrap_or(chunks);
                            out.push((ttft, itl, tokens, usage("prompt_tokens").unwrap_or(0)));
                        }
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(out)
                    })
                })
                .collect();
            let results =
                tokio::time::timeout(Duration::from_secs(1800), futures::future::join_all(tasks))
                    .await
                    .map_err(|_| "load level timed out")?;
            let wall = start.elapsed().as_secs_f64();
            let level_steps = steps().zip(steps_before).map(|(a, b)| a - b);
            let mut ttfts = Vec::new();
            let mut itls = Vec::new();
            let mut tokens = 0u64;
            let mut prompt_tokens = 0u64;
            let mut n = 0;
            for r in results {
                for (ttft, itl, t, p) in r?.map_err(|e| e.to_string())? {
                    ttfts.extend(ttft);
                    itls.extend(itl);
                    tokens += t;
                    prompt_tokens += p;
                    n += 1;
                }
            }
            ttfts.sort_by(f64::total_cmp);
            itls.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&ttfts, 50.0), percentile(&ttfts, 99.0));
            let row = json!({"clients": clients, "requests": n, "tokens": tokens, "wall_s": wall,
                             "tokens_per_s": tokens as f64 / wall,
                             "prompt_tokens_mean": prompt_tokens as f64 / n.max(1) as f64,
                             "ttft_p50_ms": p50 * 1e3, "ttft_p99_ms": p99 * 1e3,
                             "itl_p50_ms": percentile(&itls, 50.0) * 1e3,
                             "steps": level_steps});
            report.push(row.clone());
            if as_json {
                println!("{row}");
            } else {
                println!(
                    "{clients:>7}  {n:>8}  {tokens:>6}  {wall:>6.2}  {:>6.1}  {:>11.0}  {:>11.0}  {:>10.2}  {}",
                    tokens as f64 / wall,
                    p50 * 1e3,
                    p99 * 1e3,
                    percentile(&itls, 50.0) * 1e3,
                    level_steps.map_or("-".to_string(), |s| s.to_string())
                );
            }
        }
        if let Some(p) = &out_path {
            let doc = json!({
                "model": model.display().to_string(),
                "backend": format!("{backend:?}"),
                "rounds": rounds,
                "max_tokens": max_tokens,
                "max_num_seqs": batch.max_num_seqs,
                "max_batch_tokens": batch.max_batch_tokens,
                "prompt_words": prompt_words,
                "server": external.map_or("in-process rocmforge serve".to_string(), |a| a.to_string()),
                "cpu_kernels": rocmforge::quant::tile_kernels(),
                "levels": report,
            });
            std::fs::write(p, serde_json::to_string_pretty(&doc)? + "\n")?;
        }
        if let Some(server) = server {
            server.shutdown(Duration::from_secs(10)).await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// Client `c`'s request `r` of load level `level`: a short question, then `words` filler words
/// (distinct per request and per level, so no two prompts of a run share more than the chat
/// template's opening: a server's prefix cache cannot serve a later level from an earlier one).
fn prompt(level: usize, c: usize, r: usize, words: usize) -> String {
    const WORDS: [&str; 16] = [
        "river", "stone", "light", "paper", "garden", "window", "music", "winter", "market",
        "forest", "silver", "engine", "harbor", "planet", "bridge", "candle",
    ];
    let mut s = format!("Tell me about topic {level}-{c}-{r}.");
    for i in 0..words {
        s.push(' ');
        s.push_str(WORDS[(i * 7 + c * 3 + r) % WORDS.len()]);
    }
    s
}
