//! Text generation over the engine (the runtime's actors): `run` on every backend the runtime
//! serves, and the turn loop `chat` uses. Streams text to stdout, or prints one JSON object.

use super::engine::Engine;
use super::run::{GenError, RunArgs, TextSink};
use crate::cli::progress::LoadProgressBars;
use crate::messages::Constraint;
use crate::{FinishReason, GenerateRequest, Prompt, SamplingParams, SessionId};
use rocmforge::model::{StopReason, Timings};
use serde::Serialize;
use std::io::Write;
use std::time::Instant;

/// What one generation did, with timings measured around the runtime's token stream (the
/// core's `Timings`: prompt = submit to first token, decode = the tokens after it).
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// Generates from `prompt_ids`, passing each text piece to `out` (already cut at stop strings);
/// `constraint`: the output must follow it (`--grammar`, `--json-schema`, `--json-object`).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    engine: &Engine,
    prompt_ids: &[u32],
    max_tokens: usize,
    sampling: &SamplingParams,
    session: Option<SessionId>,
    constraint: Option<Constraint>,
    sink: &mut TextSink<'_>,
    mut out: impl FnMut(&str) -> Result<(), GenError>,
) -> Result<Turn, Box<dyn std::error::Error>> {
    let req = GenerateRequest {
        prompt: Prompt::Tokens(prompt_ids.to_vec()),
        max_tokens,
        sampling: sampling.clone(),
        stop_at_eos: true,
        session,
        end_session: false,
        logprobs: None,
        constraint,
    };
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut ids = Vec::new();
    let mut stop_string = false;
    let mut stream = engine.rt.generate(req).into_blocking();
    for ev in stream.by_ref() {
        let ev = ev?;
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
        ids.push(ev.token);
        let (piece, stop) = sink.push(ev.token)?;
        if !piece.is_empty() {
            out(piece)?;
        }
        if stop {
            // Dropping the stream below cancels the request.
            stop_string = true;
            break;
        }
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let stop_reason = match stream.finish_reason() {
        _ if stop_string => StopReason::Callback,
        Some(FinishReason::EndOfSequence) => StopReason::Eog,
        Some(FinishReason::ContextFull) => StopReason::Context,
        Some(FinishReason::MaxTokens) | None => StopReason::Length,
    };
    drop(stream);
    let prompt_ms = first.unwrap_or(total_ms);
    let timings = Timings {
        prompt_tokens: prompt_ids.len(),
        prompt_ms,
        decode_tokens: ids.len().saturating_sub(1),
        decode_ms: total_ms - prompt_ms,
        ..Timings::default()
    }
    .with_rates();
    Ok(Turn {
        ids,
        stop_reason,
        timings,
    })
}

/// `rocmforge run` through the engine.
pub fn run(a: &RunArgs, prompt: &str) -> Result<(), Box<dyn std::error::Error>> {
    // Bad flags fail before the model loads.
    let constraint = a.constraint()?;
    let started = Instant::now();
    let engine = Engine::open(&a.model, a.backend, &a.engine, true)?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let prompt_ids = tracing::info_span!("tokenize")
        .in_scope(|| engine.tokenizer.encode(prompt, true, true))
        .map_err(GenError::from)?;
    if prompt_ids.is_empty() {
        return Err(GenError::Run(rocmforge::model::ModelError::EmptyPrompt).into());
    }
    let bars = (!a.json).then(|| LoadProgressBars::show(&engine.rt));
    // Every sampling flag reaches the runtime (one `SamplingParams`); stop strings are cut here.
    let sampling = a.sampling.params();
    tracing::info!(seed = ?sampling.seed, "sampling");
    let mut sink = TextSink::new(&engine.tokenizer, &a.sampling.stop);
    let mut stdout = std::io::stdout();
    let json = a.json;
    let turn = generate(
        &engine,
        &prompt_ids,
        a.n_predict,
        &sampling,
        None,
        constraint,
        &mut sink,
        |piece| {
            if !json {
                // Flush per piece: the user watches the text appear.
                stdout.write_all(piece.as_bytes())?;
                stdout.flush()?;
            }
            Ok(())
        },
    )?;
    let first_token_ms = open_ms + turn.timings.prompt_ms;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let stats = engine.rt.stats();
    drop(bars);
    let backend = engine.backend;
    let tail = sink.finish().to_string();
    let text = std::mem::take(&mut sink.text);
    drop(sink);
    let trace = engine.finish_at_exit()?;
    let mut out = std::io::stdout();
    if a.json {
        let j = serde_json::json!({
            "backend": backend.to_string(),
            "seed": sampling.seed,
            "stop_reason": turn.stop_reason,
            "prompt_ids": prompt_ids,
            "ids": turn.ids,
            "text": text,
            "timings": {
                "open_ms": open_ms,
                "first_token_ms": first_token_ms,
                "total_ms": total_ms,
                "gen": turn.timings,
            },
            "stats": stats,
        });
        serde_json::to_writer(&mut out, &j)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{tail}")?;
        out.flush()?;
        let t = &turn.timings;
        eprintln!(
            "{backend}: first token {first_token_ms:.0} ms after start | prompt: {} tokens in {:.1} ms ({:.1} tok/s) | decode: {} tokens in {:.1} ms ({:.1} tok/s) | stop: {:?} | peak resident {:.1} MiB",
            t.prompt_tokens,
            t.prompt_ms,
            t.prompt_tokens_per_second,
            t.decode_tokens,
            t.decode_ms,
            t.decode_tokens_per_second,
            turn.stop_reason,
            stats.peak_resident_bytes as f64 / (1u64 << 20) as f64,
        );
        if let Some(t) = &trace {
            eprintln!(
                "trace written to {} (rocmforge trace view {} --svg out.svg)",
                t.display(),
                t.display()
            );
        }
    }
    Engine::exit_if_gpu(backend, trace.is_some());
    Ok(())
}
