//! A generation request's answer: one JSON body, or server-sent events in OpenAI's chunk format.
//! With `n > 1` the choices run one after another (they share the prompt's prefill through a
//! runtime session), so a stream sends choice 0's chunks, then choice 1's, each tagged with its
//! `index`, as OpenAI's clients expect chunks of any choice in any order.
//!
//! With tools, a chat reply's text is split into content and `tool_calls`
//! (`rocmforge::tool_calls`); streamed, content goes out as it comes (text that may begin a
//! `<tool_call>` held back) and each call as one delta carrying its id, name and whole
//! arguments once its block closes (OpenAI's delta shape; clients join argument pieces, and
//! here there is one piece). `finish_reason` is `tool_calls` when a reply that ended by itself
//! made calls.

use super::echo::Echo;
use super::generation::{Collected, Generation, Step};
use super::logprobs::{chat_content, CompletionLogprobs};
use super::openai::Usage;
use crate::messages::TokenLogprobs;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use rocmforge::tokenizer::Tokenizer;
use rocmforge::tool_calls::{CallStream, StreamEvent, ToolCall};
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
    /// Chat replies are parsed into tool calls.
    pub tools: bool,
    /// Completions: the prompt goes in front of each choice's text.
    pub echo: Option<Echo>,
}

/// A fresh id for a call (clients send it back with the result).
fn call_id() -> String {
    format!("call_{:016x}", rand::random::<u64>())
}

fn call_json(c: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({"id": call_id(), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// OpenAI's reason for a reply that made calls.
fn finish_with_calls(reason: &'static str, calls: usize) -> &'static str {
    if calls > 0 && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
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

    /// The echoed prompt's text and `logprobs` (completions), rendered with `offsets` so that
    /// the completion's offsets continue after it; `None` without `echo`.
    fn echo(&self, offsets: &mut CompletionLogprobs) -> Option<(String, Value)> {
        let e = self.echo.as_ref()?;
        let lp = match (&e.logprobs, self.logprobs) {
            (Some(steps), true) => offsets.render_prompt(&self.tokenizer, steps),
            _ => Value::Null,
        };
        Some((e.text.clone(), lp))
    }

    /// The whole answer of a request that did not stream.
    pub fn body(&self, choices: &[Collected]) -> Value {
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut offsets = CompletionLogprobs::default();
                let echo = self.echo(&mut offsets);
                let lp = self.logprobs(&c.logprobs, &mut offsets);
                match self.kind {
                    Kind::Completion => {
                        let (text, lp) = match echo {
                            Some((t, elp)) => (t + &c.text, join_logprobs(elp, lp)),
                            None => (c.text.clone(), lp),
                        };
                        json!({"text": text, "index": i, "logprobs": lp,
                               "finish_reason": c.finish_reason})
                    }
                    Kind::Chat if self.tools => {
                        let r = rocmforge::tool_calls::parse(&c.text);
                        let mut message = json!({"role": "assistant", "content": r.content});
                        if !r.calls.is_empty() {
                            message["tool_calls"] =
                                r.calls.iter().map(|c| call_json(c, None)).collect();
                        }
                        json!({"index": i, "message": message, "logprobs": lp,
                               "finish_reason": finish_with_calls(c.finish_reason, r.calls.len())})
                    }
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

/// The echo's legacy logprobs object followed by the completion's (each array joined).
fn join_logprobs(echo: Value, completion: Value) -> Value {
    match (echo, completion) {
        (Value::Object(mut e), Value::Object(c)) => {
            for (k, v) in c {
                if let (Some(Value::Array(a)), Value::Array(b)) = (e.get_mut(&k), v) {
                    a.extend(b);
                }
            }
            Value::Object(e)
        }
        (e, Value::Null) => e,
        (_, c) => c,
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
    /// With tools: the front choice's text split into content and calls, and its calls so far.
    calls: CallStream,
    n_calls: usize,
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
    /// The first chunk of a choice: the role (chat), or the echoed prompt (completions).
    fn start_chunk(&mut self) -> Value {
        let meta = &self.meta;
        match meta.kind {
            Kind::Chat => meta.chunk(self.index, Some(""), true, None),
            Kind::Completion => match meta.echo(&mut self.offsets) {
                Some((text, lp)) => {
                    let mut c = meta.chunk(self.index, Some(&text), false, None);
                    c["choices"][0]["logprobs"] = lp;
                    c
                }
                None => meta.chunk(self.index, Some(""), false, None),
            },
        }
    }

    /// Chat chunks for what the call splitter let out: content, and calls as tool-call deltas.
    fn call_chunks(&mut self, events: Vec<StreamEvent>) -> Vec<Value> {
        events
            .into_iter()
            .map(|ev| match ev {
                StreamEvent::Text(t) => self.meta.chunk(self.index, Some(&t), false, None),
                StreamEvent::Call(call) => {
                    let mut c = self.meta.chunk(self.index, None, false, None);
                    c["choices"][0]["delta"]["tool_calls"] =
                        json!([call_json(&call, Some(self.n_calls))]);
                    self.n_calls += 1;
                    c
                }
            })
            .collect()
    }

    /// The chunks of one piece of the front choice (none while a call is being held).
    fn piece_chunks(&mut self, p: super::generation::Piece) -> Vec<Value> {
        let mut chunks = if self.meta.tools {
            let evs = self.calls.push(&p.text);
            self.call_chunks(evs)
        } else {
            vec![self.meta.chunk(self.index, Some(&p.text), false, None)]
        };
        if self.meta.logprobs {
            // The log-probabilities go with the first chunk out (with a held call, the next).
            let lp = self.meta.logprobs(&p.logprobs, &mut self.offsets);
            match chunks.first_mut() {
                Some(c) => c["choices"][0]["logprobs"] = lp,
                None if !p.logprobs.is_empty() => {
                    let mut c = self.meta.chunk(self.index, None, false, None);
                    c["choices"][0]["logprobs"] = lp;
                    chunks.push(c);
                }
                None => {}
            }
        }
        chunks
    }

    /// The next event(s) and phase.
    async fn step(&mut self, phase: Phase, include_usage: bool) -> Option<(Bytes, Phase)> {
        Some(match phase {
            Phase::Start => {
                self.calls = CallStream::default();
                self.n_calls = 0;
                (sse(&self.start_chunk()), Phase::Tokens)
            }
            Phase::Tokens => loop {
                let gen = self.gens.front_mut()?;
                match gen.next().await {
                    Step::Text(p) => {
                        let chunks = self.piece_chunks(p);
                        if !chunks.is_empty() {
                            break (sse_all(&chunks), Phase::Tokens);
                        }
                    }
                    Step::Done(reason) => {
                        let mut chunks = Vec::new();
                        let mut reason = reason;
                        if self.meta.tools {
                            let evs = self.calls.finish();
                            chunks = self.call_chunks(evs);
                            reason = finish_with_calls(reason, self.n_calls);
                        }
                        let meta = &self.meta;
                        chunks.push(match meta.kind {
                            Kind::Chat => meta.chunk(self.index, None, false, Some(reason)),
                            Kind::Completion => {
                                meta.chunk(self.index, Some(""), false, Some(reason))
                            }
                        });
                        if let Some(g) = self.gens.pop_front() {
                            self.done_tokens += g.completion_tokens;
                        }
                        self.index += 1;
                        self.offsets = CompletionLogprobs::default();
                        let next = if !self.gens.is_empty() {
                            Phase::Start
                        } else if include_usage {
                            Phase::Usage(Usage::new(self.meta.prompt_tokens, self.done_tokens))
                        } else {
                            Phase::Done
                        };
                        break (sse_all(&chunks), next);
                    }
                    // OpenAI's streams report a failure as an error object, then stop.
                    Step::Failed(e) => {
                        self.outcome = "failed";
                        break (
                            Bytes::from(format!("data: {}\n\n", e.to_json())),
                            Phase::End,
                        );
                    }
                }
            },
            Phase::Usage(u) => (sse(&self.meta.usage_chunk(u)), Phase::Done),
            Phase::Done => {
                self.outcome = "done";
                (Bytes::from_static(b"data: [DONE]\n\n"), Phase::End)
            }
            Phase::End => return None,
        })
    }
}

fn sse_all(chunks: &[Value]) -> Bytes {
    let mut out = String::new();
    for c in chunks {
        out.push_str(&format!("data: {c}\n\n"));
    }
    Bytes::from(out)
}

fn event_stream(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
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
            calls: CallStream::default(),
            n_calls: 0,
            meta,
            outcome: "client gone",
        },
        Phase::Start,
    );
    let body = futures::stream::unfold(state, move |(mut st, phase)| async move {
        let (bytes, next) = st.step(phase, include_usage).await?;
        Some((Ok::<_, std::convert::Infallible>(bytes), (st, next)))
    });
    event_stream(Body::from_stream(body))
}

/// The stream of choices that generated nothing (`echo` with `max_tokens: 0`): each choice's
/// echo and its finish, the usage if asked for, `[DONE]`.
pub(crate) fn stream_collected(
    choices: &[Collected],
    meta: &Meta,
    include_usage: bool,
) -> Response {
    let mut chunks = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        let mut offsets = CompletionLogprobs::default();
        let mut first = meta.chunk(i, Some(""), false, None);
        if let Some((text, lp)) = meta.echo(&mut offsets) {
            first = meta.chunk(i, Some(&text), false, None);
            first["choices"][0]["logprobs"] = lp;
        }
        chunks.push(first);
        chunks.push(meta.chunk(i, Some(""), false, Some(c.finish_reason)));
    }
    if include_usage {
        chunks.push(meta.usage_chunk(Usage::new(meta.prompt_tokens, 0)));
    }
    let mut body = sse_all(&chunks).to_vec();
    body.extend_from_slice(b"data: [DONE]\n\n");
    event_stream(Body::from(body))
}
