//! The generation loop shared by `run`, `chat` and `bench`: prefill the prompt in one batch,
//! then decode token by token, sampling each next token. Text (decoding, stop strings) stays
//! with the caller, which sees every token through a callback and may stop early.

use super::error::ModelError;
use super::forward::Model;
use super::kv::Sequence;
use crate::sample::Sampler;
use serde::Serialize;
use std::ops::ControlFlow;
use std::time::Instant;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The requested number of tokens was produced.
    Length,
    /// An end-of-generation token was sampled (it is the last id).
    Eog,
    /// The callback asked to stop (a stop string, a cancelled request).
    Callback,
    /// The context is full.
    Context,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt_ms: f64,
    pub prompt_tokens_per_second: f64,
    /// Tokens produced by decode steps (the first generated token comes from the prefill).
    pub decode_tokens: usize,
    pub decode_ms: f64,
    pub decode_tokens_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated ids, an end-of-generation token included when one ended the run.
    pub ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

fn per_second(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// Generates up to `max_new` tokens after `context`, the sequence's whole token list: its first
/// `seq.pos()` tokens are already cached, the rest (the new prompt) is prefilled in one batch.
/// The penalties see all of `context`. `on_token` sees each new id; `ControlFlow::Break` stops
/// after that token.
pub fn generate(
    model: &Model,
    seq: &mut Sequence,
    sampler: &mut Sampler,
    context: &[u32],
    max_new: usize,
    is_eog: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    let prompt = context.get(seq.pos()..).unwrap_or(&[]);
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    // The prompt plus at least the first generated token must fit.
    seq.check_room(prompt.len())?;
    // No more tokens than the context holds can be generated: `max_new` comes from a user and
    // may be absurd (`-n 99999999999`), so it never sizes an allocation.
    let room = seq.ctx().saturating_sub(seq.pos());
    let mut all: Vec<u32> = Vec::with_capacity(context.len() + max_new.min(room));
    all.extend_from_slice(context);
    let mut ids = Vec::with_capacity(max_new.min(room));
    let mut timings = Timings {
        prompt_tokens: prompt.len(),
        ..Timings::default()
    };

    let t0 = Instant::now();
    let logits = model.forward(prompt, seq)?;
    timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
    if max_new == 0 {
        return Ok(finish(ids, StopReason::Length, timings));
    }
    let mut next = sampler.sample(logits, &all);
    let t1 = Instant::now();
    let stop = loop {
        ids.push(next);
        all.push(next);
        if is_eog(next) {
            break StopReason::Eog;
        }
        if on_token(next).is_break() {
            break StopReason::Callback;
        }
        if ids.len() >= max_new {
            break StopReason::Length;
        }
        if seq.pos() >= seq.ctx() {
            break StopReason::Context;
        }
        let logits = model.forward(&[next], seq)?;
        timings.decode_tokens += 1;
        next = sampler.sample(logits, &all);
    };
    timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    Ok(finish(ids, stop, timings))
}

fn finish(ids: Vec<u32>, stop_reason: StopReason, mut timings: Timings) -> Generation {
    timings.prompt_tokens_per_second = per_second(timings.prompt_tokens, timings.prompt_ms);
    timings.decode_tokens_per_second = per_second(timings.decode_tokens, timings.decode_ms);
    Generation {
        ids,
        stop_reason,
        timings,
    }
}
