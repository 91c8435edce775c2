//! Prefix cache at the HTTP level (issue 18): `requests` chat requests that share one long
//! system prompt, sent one after another to `rocmforge serve` started in-process on loopback;
//! reports each request's time to first token, measured at the client. The first request reads
//! the whole system prompt; the later ones should find its KV blocks in the prefix cache and
//! read only their own question.
//!
//! cargo run --profile test -p rocmforge-actors --example serve_prefix_ttft -- \
//!     [MODEL] [--requests 16] [--rounds 3] [--prefix-sentences 43] [--max-tokens 4]
//!     [--backend cpu|cuda|hip|auto] [--out results.json]
//!
//! Each round uses its own system prompt (a distinct opening line), so no round finds the
//! previous round's blocks. Per round: TTFT of request 1, the median TTFT of requests 2..N, and
//! their ratio; `--out` writes every request's numbers and the medians over rounds as JSON.

use rocmforge_actors::serve::client::post_sse;
use rocmforge_actors::serve::{ServeConfig, Server};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// A system prompt of `sentences` numbered rules (about 22 tokens each, so 43 make ~1,000 tokens
/// with the chat template), opened by a line
/// unique to `round`.
fn system_prompt(round: usize, sentences: usize) -> String {
    let mut s = format!("You are assistant {round} of the evaluation. Follow every rule below.\n");
    for i in 0..sentences {
        s.push_str(&format!(
            "Rule {i}: when asked about subject {i}, answer briefly and cite rule {i}.\n"
        ));
    }
    s
}

struct Sample {
    ttft_s: f64,
    prompt_tokens: u64,
}

async fn one_request(
    addr: std::net::SocketAddr,
    system: &str,
    question: &str,
    max_tokens: usize,
) -> Result<Sample, Box<dyn std::error::Error>> {
    let body = json!({
        "model": "bench", "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": question}],
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
    let parsed: Vec<(Instant, Value)> = resp
        .events
        .iter()
        .filter_map(|(t, e)| Some((*t, serde_json::from_str::<Value>(e).ok()?)))
        .collect();
    // The first event carrying generated text (the first chunk only announces the role).
    let first = parsed
        .iter()
        .find(|(_, v)| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .ok_or("no generated text in the stream")?;
    let prompt_tokens = parsed
        .iter()
        .find_map(|(_, v)| v["usage"]["prompt_tokens"].as_u64())
        .unwrap_or(0);
    Ok(Sample {
        ttft_s: (first.0 - sent).as_secs_f64(),
        prompt_tokens,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut requests = 16usize;
    let mut rounds = 3usize;
    let mut sentences = 43usize;
    let mut max_tokens = 4usize;
    let mut out_path: Option<PathBuf> = None;
    let mut backend = rocmforge::backend::BackendKind::Cpu;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--requests" => requests = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--prefix-sentences" => sentences = val()?.parse()?,
            "--max-tokens" => max_tokens = val()?.parse()?,
            "--out" => out_path = Some(PathBuf::from(val()?)),
            "--backend" => backend = val()?.parse()?,
            _ => model = PathBuf::from(a),
        }
    }
    if requests < 2 {
        return Err("--requests must be at least 2".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut cfg = ServeConfig::new(&model);
        cfg.port = 0;
        cfg.model_name = Some("bench".into());
        cfg.backend = backend;
        let server = Server::start(cfg).await?;
        server.wait_ready(Duration::from_secs(300)).await?;
        let addr = server.local_addr();
        println!("round  prompt_tokens  first_ttft_ms  rest_ttft_p50_ms  ratio");
        let mut report = Vec::new();
        let mut ratios = Vec::new();
        let mut firsts = Vec::new();
        let mut rests = Vec::new();
        for round in 0..rounds {
            let system = system_prompt(round, sentences);
            let mut samples = Vec::new();
            for i in 0..requests {
                let q = format!("What does rule {} say about subject {}?", i * 3, i * 3);
                samples.push(one_request(addr, &system, &q, max_tokens).await?);
            }
            let first = samples[0].ttft_s;
            let rest: Vec<f64> = samples[1..].iter().map(|s| s.ttft_s).collect();
            let rest_p50 = median(&rest);
            let ratio = rest_p50 / first;
            println!(
                "{round:>5}  {:>13}  {:>13.0}  {:>16.0}  {ratio:.3}",
                samples[0].prompt_tokens,
                first * 1e3,
                rest_p50 * 1e3
            );
            ratios.push(ratio);
            firsts.push(first);
            rests.push(rest_p50);
            report.push(json!({
                "round": round,
                "prompt_tokens": samples.iter().map(|s| s.prompt_tokens).collect::<Vec<_>>(),
                "ttft_ms": samples.iter().map(|s| s.ttft_s * 1e3).collect::<Vec<_>>(),
                "first_ttft_ms": first * 1e3,
                "rest_ttft_p50_ms": rest_p50 * 1e3,
                "rest_ttft_max_ms": rest.iter().copied().fold(0.0, f64::max) * 1e3,
                "ratio_rest_p50_to_first": ratio,
            }));
        }
        println!(
            "median over {rounds} rounds: first {:.0} ms, rest p50 {:.0} ms, ratio {:.3}",
            median(&firsts) * 1e3,
            median(&rests) * 1e3,
            median(&ratios)
        );
        if let Some(p) = &out_path {
            let doc = json!({
                "model": model.display().to_string(),
                "requests": requests,
                "rounds": rounds,
                "prefix_sentences": sentences,
                "max_tokens": max_tokens,
                "backend": backend.to_string(),
                "median_first_ttft_ms": median(&firsts) * 1e3,
                "median_rest_ttft_p50_ms": median(&rests) * 1e3,
                "median_ratio": median(&ratios),
                "per_round": report,
            });
            std::fs::write(p, serde_json::to_string_pretty(&doc)? + "\n")?;
        }
        server.shutdown(Duration::from_secs(10)).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
