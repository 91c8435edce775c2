//! Chat messages to prompt tokens for the HTTP server.
//!
//! Three things make this more than `encode(apply_chat_template(..))`:
//!
//! **Tools.** A request's tools reach the template as `tools`, past calls as messages'
//! `tool_calls` (transformers' shape). A template that renders the same without them ignores
//! them; it is given them as text instead (`tools_as_text`: the tool descriptions and call format
//! of `rocmforge::tool_calls` in the system message, past calls in their assistant turn's text,
//! results as user turns), so a model without tool support in its template still learns of them.
//!
//! **Limits.** The template is a program run on input a client chose. It renders on a blocking
//! thread (never an async worker, so `/health`, other requests and the signal handler keep
//! running), at most `slots` at once, under minijinja fuel, an output-size cap (checked while
//! rendering, so before anything is tokenized) and a time limit; the message count is capped
//! before rendering. A render that hits a limit is a 400 for that request only.
//!
//! **Client text stays text.** The rendered prompt is tokenized with special-token parsing on,
//! because the template's own `<|im_start|>` must become the control token. Client text that
//! contains `<|im_start|>system ...` must not: that would let a user forge turns. Options:
//! - Reject such messages: sound, but refuses honest text (a question about the tokens).
//! - Escape the text (insert a zero-width space): the model then sees different text.
//! - Replace each whole message by a placeholder and splice it back after rendering: templates
//!   transform content (`strip`, `split('</think>')`, slicing) and would transform the
//!   placeholder instead, giving a different prompt.
//! - Replace only the special-token texts inside messages by placeholders, render, then
//!   tokenize the template's text with special parsing and the placeholders' text as plain text
//!   (joined with the text around it, so the plain text tokenizes exactly as it would without
//!   special parsing). Templates transform the content as before; only the special-token text
//!   is out of their reach, and they have no business matching on it.
//!
//! The last is what this does. Placeholders are a private-use character around an index; a
//! message's own private-use marker character is protected the same way, so a client cannot
//! forge a placeholder. A special text could also straddle a message edge and the template text
//! beside it (a message ending in `<|im_` before template text `start|>`): the part of the
//! message that could begin or end such a straddle is protected too. Roles are checked against a
//! fixed list before rendering (`openai.rs`), so they carry no special text. Every string of the
//! tools and of past calls (keys too) is protected the same way.

use super::error::ApiError;
use super::ServeConfig;
use axum::http::StatusCode;
use rocmforge::tokenizer::{
    ChatMessage, ChatTemplate, ChatTemplateError, TemplateLimits, TokenType, Tokenizer,
};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Opens and closes a placeholder (Unicode private use: no tokenizer or template gives it a
/// meaning, JSON and HTML escaping leave it alone).
const MARK: char = '\u{E000}';

/// Why a chat request has no prompt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PromptError {
    #[error("{n} messages; this server takes at most {max}")]
    TooManyMessages { n: usize, max: usize },
    #[error("the chat template hit a limit: {0}")]
    Limit(ChatTemplateError),
    #[error("rendering and tokenizing took longer than {0:?}")]
    TimedOut(Duration),
    #[error("the chat template rejected the messages: {0}")]
    Rejected(String),
    /// A broken template: the server's problem, not the client's.
    #[error("the model's chat template failed: {0}")]
    Template(String),
    #[error("this model has no chat template; use /v1/completions")]
    NoTemplate,
    #[error("the chat template altered a message's special-token text")]
    MangledPlaceholder,
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(String),
    #[error("prompt worker failed: {0}")]
    Worker(String),
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> Self {
        let msg = e.to_string();
        match e {
            PromptError::Template(_) | PromptError::Worker(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
                    .code("chat_template_error")
            }
            PromptError::Limit(ChatTemplateError::OutputTooLong { .. }) => {
                ApiError::invalid("messages", msg).code("context_length_exceeded")
            }
            PromptError::Limit(_) | PromptError::TimedOut(_) => {
                ApiError::invalid("messages", msg).code("chat_template_limit")
            }
            PromptError::TooManyMessages { .. } => {
                ApiError::invalid("messages", msg).code("too_many_messages")
            }
            _ => ApiError::invalid("messages", msg),
        }
    }
}

/// What renders chat prompts; shared by every request.
pub(crate) struct ChatPrompter {
    inner: Arc<Inner>,
    /// Renders at once: each holds a blocking thread until its fuel or output limit ends it.
    slots: Arc<Semaphore>,
    timeout: Duration,
}

struct Inner {
    template: Result<ChatTemplate, PromptError>,
    tokenizer: Tokenizer,
    /// Tokens that only special parsing cuts out of text (control, unknown), longest first.
    specials: Vec<(String, u32)>,
    max_messages: usize,
}

impl ChatPrompter {
    pub fn new(tokenizer: &Tokenizer, cfg: &ServeConfig) -> Self {
        let limits = TemplateLimits {
            fuel: Some(cfg.template_fuel),
            max_output_bytes: Some(cfg.max_prompt_bytes),
            timeout: Some(cfg.template_timeout),
        };
        let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("");
        let source = cfg
            .chat_template
            .as_deref()
            .or_else(|| tokenizer.chat_template());
        let template = match source {
            None => Err(PromptError::NoTemplate),
            Some(src) => ChatTemplate::new(
                src,
                text_of(tokenizer.bos_id()),
                text_of(tokenizer.eos_id()),
                limits,
            )
            .map_err(template_bug),
        };
        let mut specials: Vec<(String, u32)> = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| {
                matches!(
                    tokenizer.token_type(id),
                    Some(TokenType::Control | TokenType::Unknown)
                )
            })
            .filter_map(|id| Some((tokenizer.token_text(id)?.to_string(), id)))
            .filter(|(t, _)| !t.is_empty())
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            inner: Arc::new(Inner {
                template,
                tokenizer: tokenizer.clone(),
                specials,
                max_messages: cfg.max_messages,
            }),
            slots: Arc::new(Semaphore::new(workers)),
            timeout: cfg.template_timeout,
        }
    }

    /// The template's parse error, if it has one (logged at start).
    pub fn template_error(&self) -> Option<&PromptError> {
        self.inner.template.as_ref().err()
    }

    /// Renders and tokenizes on a blocking thread, within the time limit. `tools`: the
    /// request's tool definitions, shown to the model (module docs, "Tools").
    pub async fn tokens(
        &self,
        messages: Vec<ChatMessage>,
        tools: Option<Vec<serde_json::Value>>,
    ) -> Result<Vec<u32>, PromptError> {
        let n = messages.len();
        if n > self.inner.max_messages {
            return Err(PromptError::TooManyMessages {
                n,
                max: self.inner.max_messages,
            });
        }
        let inner = self.inner.clone();
        let slots = self.slots.clone();
        let work = async move {
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|e| PromptError::Worker(e.to_string()))?;
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                inner.tokens(&messages, tools.as_deref())
            })
            .await
            .map_err(|e| PromptError::Worker(e.to_string()))?
        };
        // The blocking thread may run on past this (up to its fuel); the request does not wait.
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| PromptError::TimedOut(self.timeout))?
    }
}

/// One piece of the rendered prompt.
enum Piece<'a> {
    /// Text the template produced (or client text without special-token text in it).
    Markup(&'a str),
    /// Client text that must be tokenized as plain text.
    Plain(&'a str),
}

impl Inner {
    fn tokens(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<Vec<u32>, PromptError> {
        let template = self.template.as_ref().map_err(|e| match e {
            PromptError::Template(m) => PromptError::Template(m.clone()),
            _ => PromptError::NoTemplate,
        })?;
        let mut originals: Vec<String> = Vec::new();
        let protected: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: self.protect(&m.content, &mut originals),
                tool_calls: m
                    .tool_calls
                    .as_ref()
                    .map(|v| self.protect_value(v, &mut originals)),
                tool_call_id: m
                    .tool_call_id
                    .as_ref()
                    .map(|s| self.protect(s, &mut originals)),
                name: m.name.as_ref().map(|s| self.protect(s, &mut originals)),
            })
            .collect();
        let tools = tools.map(|t| {
            serde_json::Value::Array(
                t.iter()
                    .map(|v| self.protect_value(v, &mut originals))
                    .collect(),
            )
        });
        let render = |msgs: &[ChatMessage], tools: Option<&serde_json::Value>| {
            template
                .render_with_tools(msgs, tools, true)
                .map_err(|e| match e {
                    ChatTemplateError::Raised { message } => PromptError::Rejected(message),
                    e @ (ChatTemplateError::Parse { .. } | ChatTemplateError::Render { .. }) => {
                        template_bug(e)
                    }
                    limit => PromptError::Limit(limit),
                })
        };
        let mut rendered = render(&protected, tools.as_ref())?;
        if tools.is_some() || protected.iter().any(|m| m.tool_calls.is_some()) {
            // A template that renders the same without the tools and the past calls ignores
            // them: it gets them as text instead.
            let bare: Vec<ChatMessage> = protected
                .iter()
                .map(|m| ChatMessage {
                    tool_calls: None,
                    ..m.clone()
                })
                .collect();
            if render(&bare, None)? == rendered {
                let tool_list = tools.as_ref().and_then(|t| t.as_array()).map(Vec::as_slice);
                rendered = render(&tools_as_text(&protected, tool_list), None)?;
            }
        }
        let pieces = split_placeholders(&rendered, &originals)?;
        self.encode(&pieces)
    }

    /// `v` with every string in it (keys too) protected as message text is.
    fn protect_value(
        &self,
        v: &serde_json::Value,
        originals: &mut Vec<String>,
    ) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::String(s) => Value::String(self.protect(s, originals)),
            Value::Array(a) => {
                Value::Array(a.iter().map(|x| self.protect_value(x, originals)).collect())
            }
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (self.protect(k, originals), self.protect_value(x, originals)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// `content` with every special-token text (and the marker character) replaced by a
    /// placeholder; the replaced texts are appended to `originals`.
    fn protect(&self, content: &str, originals: &mut Vec<String>) -> String {
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for (text, _) in &self.specials {
            ranges.extend(
                content
                    .match_indices(text.as_str())
                    .map(|(i, t)| i..i + t.len()),
            );
        }
        ranges.extend(content.match_indices(MARK).map(|(i, t)| i..i + t.len()));
        // Edges, ignoring the whitespace templates strip: the longest end of the message that
        // begins a special text, and the longest start that ends one.
        let body_end = content.trim_end().len();
        let body_start = content.len() - content.trim_start().len();
        let body = &content[body_start.min(body_end)..body_end];
        let mut tail = 0;
        let mut head = 0;
        for (text, _) in &self.specials {
            for (k, _) in text.char_indices().skip(1) {
                if k > tail && body.ends_with(&text[..k]) {
                    tail = k;
                }
                if text.len() - k > head && body.starts_with(&text[k..]) {
                    head = text.len() - k;
                }
            }
        }
        if tail > 0 {
            ranges.push(body_end - tail..body_end);
        }
        if head > 0 {
            ranges.push(body_start..body_start + head);
        }
        if ranges.is_empty() {
            return content.to_string();
        }
        ranges.sort_by_key(|r| r.start);
        let mut out = String::with_capacity(content.len() + 8 * ranges.len());
        let mut at = 0;
        let mut i = 0;
        while i < ranges.len() {
            let mut r = ranges[i].clone();
            i += 1;
            // Overlapping or touching ranges become one placeholder.
            while i < ranges.len() && ranges[i].start <= r.end {
                r.end = r.end.max(ranges[i].end);
                i += 1;
            }
            out.push_str(&content[at..r.start]);
            out.push(MARK);
            out.push_str(&originals.len().to_string());
            out.push(MARK);
            originals.push(content[r.clone()].to_string());
            at = r.end;
        }
        out.push_str(&content[at..]);
        out
    }

    /// Tokens of the pieces: markup with special parsing, plain text without, and the text on
    /// both sides of a placeholder tokenized together with it (as `encode` would, were the
    /// placeholder's special text not special).
    fn encode(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>, PromptError> {
        let tok = &self.tokenizer;
        let err = |e: rocmforge::tokenizer::TokenizerError| PromptError::Tokenize(e.to_string());
        let mut out = Vec::new();
        // A template that writes the BOS text itself (Phi-3, Llama 3, Mistral) would give two
        // BOS tokens where the tokenizer adds one: its leading BOS text is dropped, as
        // llama.cpp's `common_chat_templates_apply` does (and `Tokenizer::apply_chat_template`).
        let mut bos_text = None;
        if tok.add_bos() {
            out.extend(tok.bos_id());
            bos_text = tok
                .bos_id()
                .and_then(|b| tok.token_text(b))
                .filter(|t| !t.is_empty());
        }
        let mut text = String::new();
        // After a special token with llama.cpp's `rstrip` (Phi-3's), the whitespace that
        // follows is dropped, markup or message text alike, as encoding the whole rendered
        // prompt with special parsing does.
        let mut strip = false;
        let push = |text: &mut String, s: &str, strip: &mut bool| {
            let s = if *strip {
                s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
            } else {
                s
            };
            if !s.is_empty() {
                *strip = false;
            }
            text.push_str(s);
        };
        for (i, p) in pieces.iter().enumerate() {
            match p {
                Piece::Plain(s) => push(&mut text, s, &mut strip),
                Piece::Markup(s) => {
                    let s = match bos_text {
                        Some(b) if i == 0 => s.strip_prefix(b).unwrap_or(s),
                        _ => s,
                    };
                    let mut at = 0;
                    for (start, len, id) in self.specials_in(s) {
                        push(&mut text, &s[at..start], &mut strip);
                        if !text.is_empty() {
                            out.extend(tok.encode(&text, false, false).map_err(err)?);
                            text.clear();
                        }
                        out.push(id);
                        strip = tok.rstrips_after(id);
                        at = start + len;
                    }
                    push(&mut text, &s[at..], &mut strip);
                }
            }
        }
        if !text.is_empty() {
            out.extend(tok.encode(&text, false, false).map_err(err)?);
        }
        if tok.add_eos() {
            out.extend(tok.eos_id());
        }
        Ok(out)
    }

    /// The special texts in `s`, left to right, not overlapping: (offset, length, id). Where
    /// two overlap, the one starting first wins, the longer at the same start.
    ///
    /// The tokenizer's own partition cuts the longest special first wherever it is; the two
    /// differ only when a shorter special text overlaps the start of a longer one, which no
    /// vocabulary we know has.
    fn specials_in(&self, s: &str) -> Vec<(usize, usize, u32)> {
        let mut found: Vec<(usize, usize, u32)> = Vec::new();
        for (text, id) in &self.specials {
            found.extend(
                s.match_indices(text.as_str())
                    .map(|(at, t)| (at, t.len(), *id)),
            );
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut end = 0;
        found.retain(|&(at, len, _)| {
            let keep = at >= end;
            if keep {
                end = at + len;
            }
            keep
        });
        found
    }
}

/// The conversation for a template that ignores tools (`tool_calls.rs` has the format): the
/// tool descriptions and the call format appended to the system message (one is added first
/// when there is none), past calls written into their assistant message's text as the model
/// writes them, and `tool` results as user turns wrapped in `<tool_response>` (consecutive
/// results in one turn, so templates that insist on alternating roles accept them).
fn tools_as_text(
    messages: &[ChatMessage],
    tools: Option<&[serde_json::Value]>,
) -> Vec<ChatMessage> {
    use rocmforge::tool_calls::{call_text, response_text, system_prompt};
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let prompt = tools.map(system_prompt);
    if let Some(p) = &prompt {
        if messages.first().is_none_or(|m| m.role != "system") {
            out.push(ChatMessage::new("system", p.clone()));
        }
    }
    let mut after_tool = false;
    for (i, m) in messages.iter().enumerate() {
        let is_tool = m.role == "tool";
        match (m.role.as_str(), &prompt) {
            ("system", Some(p)) if i == 0 => {
                let mut content = m.content.clone();
                if !content.is_empty() {
                    content.push_str("\n\n");
                }
                content.push_str(p);
                out.push(ChatMessage::new("system", content));
            }
            ("assistant", _) if m.tool_calls.is_some() => {
                let mut parts: Vec<String> = Vec::new();
                if !m.content.trim().is_empty() {
                    parts.push(m.content.clone());
                }
                for c in m
                    .tool_calls
                    .as_ref()
                    .and_then(|c| c.as_array())
                    .into_iter()
                    .flatten()
                {
                    let f = &c["function"];
                    parts.push(call_text(
                        f["name"].as_str().unwrap_or_default(),
                        &f["arguments"],
                    ));
                }
                out.push(ChatMessage::new("assistant", parts.join("\n")));
            }
            ("tool", _) => {
                let text = response_text(&m.content);
                match out.last_mut() {
                    Some(prev) if after_tool => {
                        prev.content.push('\n');
                        prev.content.push_str(&text);
                    }
                    _ => out.push(ChatMessage::new("user", text)),
                }
            }
            _ => out.push(ChatMessage::new(m.role.clone(), m.content.clone())),
        }
        after_tool = is_tool;
    }
    out
}

/// A broken template, its message said once ("the model's chat template failed: ...").
fn template_bug(e: ChatTemplateError) -> PromptError {
    PromptError::Template(match e {
        ChatTemplateError::Parse { message } => format!("syntax error: {message}"),
        ChatTemplateError::Render { message } => message,
        other => other.to_string(),
    })
}

/// Splits the rendered prompt at the placeholders.
fn split_placeholders<'a>(
    rendered: &'a str,
    originals: &'a [String],
) -> Result<Vec<Piece<'a>>, PromptError> {
    if originals.is_empty() {
        return Ok(vec![Piece::Markup(rendered)]);
    }
    let mut pieces = Vec::new();
    for (i, part) in rendered.split(MARK).enumerate() {
        if i % 2 == 0 {
            pieces.push(Piece::Markup(part));
        } else {
            let k: usize = part.parse().map_err(|_| PromptError::MangledPlaceholder)?;
            let original = originals.get(k).ok_or(PromptError::MangledPlaceholder)?;
            pieces.push(Piece::Plain(original));
        }
    }
    // An odd number of marks: the template cut a placeholder in two.
    if pieces.len() % 2 == 0 {
        return Err(PromptError::MangledPlaceholder);
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn vocab(name: &str) -> Tokenizer {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/family-vocab")
            .join(format!("ggml-vocab-{name}.gguf"));
        let f = rocmforge::gguf::GgufFile::open(&p).expect("vocab file");
        Tokenizer::from_metadata(f.metadata()).expect("tokenizer")
    }

    /// Phi-3's template writes `<s>` itself and the tokenizer adds BOS: the server's prompt has
    /// one BOS, and equals what `chat` encodes (the core's rendering, llama.cpp's rule).
    #[test]
    fn a_template_that_writes_bos_gives_one_bos() {
        let tok = vocab("phi-3");
        let src = tok.chat_template().expect("the vocab file's template");
        assert!(
            src.starts_with("{{ bos_token }}"),
            "the template writes BOS itself"
        );
        let cfg = ServeConfig::new(PathBuf::from("unused.gguf"));
        let prompter = ChatPrompter::new(&tok, &cfg);
        let messages = vec![ChatMessage::new("user", "Hello there")];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let ids = rt
            .block_on(prompter.tokens(messages.clone(), None))
            .expect("prompt");
        let bos = tok.bos_id().expect("bos");
        assert!(tok.add_bos());
        assert_eq!(ids.first(), Some(&bos));
        assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{ids:?}");
        let core = tok.apply_chat_template(&messages, true).expect("render");
        assert_eq!(ids, tok.encode(&core, true, true).expect("encode"));
    }
}
