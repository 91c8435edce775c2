//! A generation request's answer: one JSON body, or server-sent events in OpenAI's chunk format.
//! With `n > 1` the choices run one after another (they share the prompt's prefill through a
//! runtime session), so a stream sends choice 0's chunks, then choice 1's, each tagged with its
//! `index`, as OpenAI's clients expect chunks of any choice in any order.

use super::generation::{Collected, Generation, Step};
use super::logprobs::{chat_content, CompletionLogprobs};
use super::openai::Usage;
use crate::messages::TokenLogprobs;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use rocmforge::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// What every part of an answer carries.
pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    /// The request's number (for its log line) and when it arrived.
    pub request: u64,
    pub arrived: Instant,
    pub prompt_tokens: usize,
    /// Log-probabilities asked for: rendered with the model's tokenizer.
    pub logprobs: bool,
    pub tokenizer: Tokenizer,
}

impl Meta {
    pub fn path(&self) -> &'static str {
        match self.kind {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A choice's `logprobs` value (`null` when not asked for).
    fn logprobs(&self, steps: &[TokenLogprobs], offsets: &mut CompletionLogprobs) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({"content": chat_content(&self.tokenizer, steps)}),
            Kind::Completion => offsets.render(&self.tokenizer, steps),
        }
    }

    /// The whole answer of a request that did not stream.
    pub fn body(&self, choices: &[Collected]) -> Value {
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let lp = self.logprobs(&c.logprobs, &mut CompletionLogprobs::default());
                match self.kind {
                    Kind::Completion => json!({"text": c.text, "index": i, "logprobs": lp,
                                               "finish_reason": c.finish_reason}),
                    Kind::Chat => json!({"index": i,
                                         "message": {"role": "assistant", "content": c.text},
                                         "logprobs": lp, "finish_reason": c.finish_reason}),
                }
            })
            .collect();
        let completion = choices.iter().map(|c| c.completion_tokens).sum();
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": list,
            "usage": Usage::new(self.prompt_tokens, completion),
        })
    }

    /// One chunk of choice `index`: its text (or the role announcement / the finish reason)
    /// and the log-probabilities of the tokens it covers.
    fn chunk(&self, index: usize, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": self.object(true), "created": self.created,
                "model": self.model,
                "choices": [{"text": text.unwrap_or(""), "index": index, "logprobs": null,
                             "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": self.object(true), "created": self.created,
                    "model": self.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
        }
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [], "usage": usage})
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

enum Phase {
    /// The first chunk of the choice at the front.
    Start,
    Tokens,
    Usage(Usage),
    Done,
    End,
}

/// A stream's generations (the one at the front is running) and metadata; dropped once, when
/// the stream ends or the client goes, which is when the request's log line is written.
struct Streamed {
    gens: VecDeque<Generation>,
    /// The index of the choice at the front.
    index: usize,
    /// Completion tokens of the finished choices.
    done_tokens: usize,
    offsets: CompletionLogprobs,
    meta: Meta,
    /// How it ended, for the log line; until the end, a client that went away.
    outcome: &'static str,
}

impl Drop for Streamed {
    fn drop(&mut self) {
        let ms = self.meta.arrived.elapsed().as_secs_f64() * 1e3;
        let completion =
            self.done_tokens + self.gens.iter().map(|g| g.completion_tokens).sum::<usize>();
        tracing::info!(
            "request {} POST {} 200 stream {} prompt_tokens={} completion_tokens={completion} \
             time_ms={ms:.1}",
            self.meta.request,
            self.meta.path(),
            self.outcome,
            self.meta.prompt_tokens,
        );
    }
}

impl Streamed {
    /// The next event and phase.
    async fn step(&mut self, phase: Phase, include_usage: bool) -> Option<(Bytes, Phase)> {
        let meta = &self.meta;
        Some(match phase {
            Phase::Start => {
                let first = match meta.kind {
                    Kind::Chat => meta.chunk(self.index, Some(""), true, None),
                    Kind::Completion => meta.chunk(self.index, Some(""), false, None),
                };
                (sse(&first), Phase::Tokens)
            }
            Phase::Tokens => {
                let gen = self.gens.front_mut()?;
                match gen.next().await {
                    Step::Text(p) => {
                        let mut c = meta.chunk(self.index, Some(&p.text), false, None);
                        c["choices"][0]["logprobs"] = meta.logprobs(&p.logprobs, &mut self.offsets);
                        (sse(&c), Phase::Tokens)
                    }
                    Step::Done(reason) => {
                        let last = match meta.kind {
                            Kind::Chat => meta.chunk(self.index, None, false, Some(reason)),
                            Kind::Completion => {
                                meta.chunk(self.index, Some(""), false, Some(reason))
                            }
                        };
                        if let Some(g) = self.gens.pop_front() {
                            self.done_tokens += g.completion_tokens;
                        }
                        self.index += 1;
                        self.offsets = CompletionLogprobs::default();
                        let next = if !self.gens.is_empty() {
                            Phase::Start
                        } else if include_usage {
                            Phase::Usage(Usage::new(meta.prompt_tokens, self.done_tokens))
                        } else {
                            Phase::Done
                        };
                        (sse(&last), next)
                    }
                    // OpenAI's streams report a failure as an error object, then stop.
                    Step::Failed(e) => {
                        self.outcome = "failed";
                        (
                            Bytes::from(format!("data: {}\n\n", e.to_json())),
                            Phase::End,
                        )
                    }
                }
            }
            Phase::Usage(u) => (sse(&meta.usage_chunk(u)), Phase::Done),
            Phase::Done => {
                self.outcome = "done";
                (Bytes::from_static(b"data: [DONE]\n\n"), Phase::End)
            }
            Phase::End => return None,
        })
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. When the client
/// goes away hyper drops this stream, and with it the generations: the request is cancelled.
pub(crate) fn stream_response(gens: Vec<Generation>, meta: Meta, include_usage: bool) -> Response {
    let state = (
        Streamed {
            gens: gens.into(),
            index: 0,
            done_tokens: 0,
            offsets: CompletionLogprobs::default(),
            meta,
            outcome: "client gone",
        },
        Phase::Start,
    );
    let body = futures::stream::unfold(state, move |(mut st, phase)| async move {
        let (bytes, next) = st.step(phase, include_usage).await?;
        Some((Ok::<_, std::convert::Infallible>(bytes), (st, next)))
    });
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
