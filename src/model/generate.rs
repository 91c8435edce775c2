//! What a generation loop reports: the ids, why it stopped, and its timings. The loop itself
//! lives in the runtime's inference actor (every entry point goes through it).

use serde::Serialize;

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

impl Timings {
    /// The same counts and times with the rates filled in.
    pub fn with_rates(mut self) -> Self {
        self.prompt_tokens_per_second = per_second(self.prompt_tokens, self.prompt_ms);
        self.decode_tokens_per_second = per_second(self.decode_tokens, self.decode_ms);
        self
    }
}

impl Generation {
    /// A finished generation; fills in the rates from the counts and times.
    pub fn finish(ids: Vec<u32>, stop_reason: StopReason, timings: Timings) -> Self {
        let timings = timings.with_rates();
        Generation {
            ids,
            stop_reason,
            timings,
        }
    }
}
