//! One generation as the HTTP layer sees it: text pieces with stop strings held back, the finish
//! reason, token counts and latency metrics. Dropping it drops the runtime's `TokenStream`,
//! which cancels the request.

use super::error::ApiError;
use super::metrics::{GaugeGuard, Metrics};
use crate::error::RuntimeError;
use crate::messages::{FinishReason, TokenLogprobs};
use crate::pipeline::inference::StreamItem;
use crate::runtime::TokenStream;
use futures::{FutureExt, StreamExt};
use rocmforge::sample::StopStrings;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Text that is safe to send (never part of a stop string) and the log-probabilities of the
/// tokens received since the last piece (when the request asked for them).
#[derive(Debug, Default)]
pub struct Piece {
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
}

/// What `next` yields.
#[derive(Debug)]
pub enum Step {
    /// Never empty: text, log-probabilities or both.
    Text(Piece),
    /// The end; `finish_reason` in OpenAI's words.
    Done(&'static str),
    Failed(ApiError),
}

pub struct Generation {
    stream: Option<TokenStream>,
    /// Item taken out of the stream by `admit` before the response started.
    pending: Option<StreamItem>,
    stops: StopStrings,
    text: String,
    emitted: usize,
    /// Log-probabilities not yet sent with a piece.
    logprobs: Vec<TokenLogprobs>,
    finished: Option<&'static str>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    metrics: Arc<Metrics>,
    admitted: Instant,
    last_token: Option<Instant>,
    // Gauges: waiting until the first token, running after it.
    waiting: Option<GaugeGuard>,
    running: Option<GaugeGuard>,
}

impl Generation {
    /// Wraps a stream just returned by `RuntimeHandle::generate` and looks at its first item
    /// without waiting: a full queue or a stopped runtime is answered before any response is
    /// started (so it can be a 429/503 with `Retry-After`).
    pub fn admit(
        mut stream: TokenStream,
        prompt_tokens: usize,
        stop: &[String],
        metrics: Arc<Metrics>,
    ) -> Result<Self, ApiError> {
        let pending = match stream.next().now_or_never() {
            Some(Some(Err(e))) => {
                if matches!(e, RuntimeError::QueueFull { .. }) {
                    metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e.into());
            }
            Some(item) => item,
            None => None,
        };
        metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        Ok(Self {
            stream: Some(stream),
            pending,
            stops: StopStrings::new(stop),
            text: String::new(),
            emitted: 0,
            logprobs: Vec::new(),
            finished: None,
            prompt_tokens,
            completion_tokens: 0,
            waiting: Some(GaugeGuard::inc(metrics.clone(), |m| &m.waiting)),
            running: None,
            metrics,
            admitted: Instant::now(),
            last_token: None,
        })
    }

    async fn recv(&mut self) -> Option<StreamItem> {
        if let Some(p) = self.pending.take() {
            return Some(p);
        }
        match &mut self.stream {
            Some(s) => s.next().await,
            None => None,
        }
    }

    /// The next piece of text, or the end.
    pub async fn next(&mut self) -> Step {
        loop {
            if let Some(reason) = self.finished {
                return Step::Done(reason);
            }
            match self.recv().await {
                Some(Ok(ev)) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => {
                            self.metrics.ttft.observe(now - self.admitted);
                            self.waiting = None;
                            self.running =
                                Some(GaugeGuard::inc(self.metrics.clone(), |m| &m.running));
                        }
                        Some(t) => self.metrics.itl.observe(now - t),
                    }
                    self.last_token = Some(now);
                    self.completion_tokens += 1;
                    self.metrics
                        .completion_tokens
                        .fetch_add(1, Ordering::Relaxed);
                    self.text.push_str(&ev.text);
                    self.logprobs.extend(ev.logprobs);
                    let tail = &self.text[self.emitted..];
                    if let Some(at) = self.stops.find(tail) {
                        let piece = tail[..at].to_string();
                        self.finish("stop");
                        if let Some(p) = self.piece(piece) {
                            return Step::Text(p);
                        }
                        continue;
                    }
                    let safe = self.stops.safe_len(tail);
                    if safe > 0 {
                        let piece = tail[..safe].to_string();
                        self.emitted += safe;
                        if let Some(p) = self.piece(piece) {
                            return Step::Text(p);
                        }
                    }
                }
                Some(Err(e)) => {
                    self.finish("error");
                    return Step::Failed(e.into());
                }
                None => {
                    let reason = match self.stream.as_ref().and_then(|s| s.finish_reason()) {
                        Some(FinishReason::EndOfSequence) => "stop",
                        Some(FinishReason::MaxTokens | FinishReason::ContextFull) => "length",
                        // The stream ended without a reason: the runtime went away.
                        None => {
                            self.finish("error");
                            return Step::Failed(RuntimeError::ShutDown.into());
                        }
                    };
                    // Text held back for a stop string that never completed.
                    let rest = self.text[self.emitted..].to_string();
                    self.finish(reason);
                    if let Some(p) = self.piece(rest) {
                        return Step::Text(p);
                    }
                }
            }
        }
    }

    /// `text` with the log-probabilities waiting to go out; `None` when both are empty.
    fn piece(&mut self, text: String) -> Option<Piece> {
        if text.is_empty() && self.logprobs.is_empty() {
            return None;
        }
        Some(Piece {
            text,
            logprobs: std::mem::take(&mut self.logprobs),
        })
    }

    /// Ends the generation: the runtime stream is dropped (cancelling it if still running).
    fn finish(&mut self, reason: &'static str) {
        self.finished = Some(reason);
        self.emitted = self.text.len();
        self.stream = None;
        self.waiting = None;
        self.running = None;
    }

    /// Runs to the end.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut out = Piece::default();
        loop {
            match self.next().await {
                Step::Text(p) => {
                    out.text.push_str(&p.text);
                    out.logprobs.extend(p.logprobs);
                }
                Step::Done(r) => {
                    return Ok(Collected {
                        text: out.text,
                        logprobs: out.logprobs,
                        finish_reason: r,
                        completion_tokens: self.completion_tokens,
                    })
                }
                Step::Failed(e) => return Err(e),
            }
        }
    }
}

/// A whole generation.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: &'static str,
    pub completion_tokens: usize,
}

impl Collected {
    /// A generation of no tokens (`max_tokens: 0`).
    pub fn empty(finish_reason: &'static str) -> Self {
        Self {
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason,
            completion_tokens: 0,
        }
    }
}
