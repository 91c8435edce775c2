//! OpenAI request and response bodies, and the checks that turn a request into a `Job` plan.
//!
//! Fields are typed (a string where a number belongs is a 400 naming the field); fields this
//! server does not implement are ignored when harmless and rejected when they change the answer
//! (`echo`, `best_of > n`, `logit_bias`, `tools`, `response_format` other than text).

use super::error::ApiError;
use crate::messages::{Constraint, SamplingParams};
use serde::{Deserialize, Serialize};

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Completion `prompt`: a string, one-element array of strings, token ids, or one array of ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Parameters shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// Chat: `true`/`false`; completions: how many alternatives (0..=20).
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token with `logprobs: true` (0..=20).
    pub top_logprobs: Option<i64>,
    pub best_of: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    /// Not implemented: rejected unless empty, since ignoring it changes the answer silently.
    pub logit_bias: Option<serde_json::Value>,
    /// Not implemented (no tool calling): rejected unless empty.
    pub tools: Option<serde_json::Value>,
    /// Rejected unless `none` or `auto` (with no tools, both mean plain text).
    pub tool_choice: Option<serde_json::Value>,
    /// The legacy names of `tools` and `tool_choice`: rejected unless empty.
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name": ..., "schema": {...}}}`.
    pub response_format: Option<serde_json::Value>,
}

/// The `model` a request names must be the one served (400 without one, 404 for another).
pub fn check_model(model: Option<&str>, served_model: &str) -> Result<(), ApiError> {
    match model {
        None => {
            return Err(ApiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
        Some(m) if m != served_model => {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{m}` does not exist; this server serves `{served_model}`"),
            )
            .param("model")
            .code("model_not_found"))
        }
        Some(_) => {}
    }
    Ok(())
}

/// `null`, `{}` and `[]` ask for nothing.
fn is_empty_value(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Chat message `content`: a string or an array of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// What a request asks of the engine once checked.
#[derive(Debug, Clone)]
pub struct Checked {
    /// `None`: up to the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate from the prompt (1..=`MAX_N`).
    pub n: usize,
    /// Log-probabilities with this many alternatives per token; `None`: none.
    pub logprobs: Option<usize>,
    /// `response_format` as a constraint on the output (`None`: plain text).
    pub constraint: Option<Constraint>,
}

/// Most choices one request may ask for (`n`): each is a whole generation, run one after
/// another on the prompt's shared prefill.
pub const MAX_N: i64 = 16;

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        other => Ok(other),
    }
}

impl CommonParams {
    /// Checks the model name and every sampling parameter.
    pub fn check(&self, served_model: &str) -> Result<Checked, ApiError> {
        check_model(self.model.as_deref(), served_model)?;
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_N).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be between 1 and {MAX_N}, got {n}"),
                ))
            }
        };
        // `best_of` equal to `n` is what is done anyway; more would need ranking the extra
        // sequences, which this server does not do.
        if self.best_of.is_some_and(|b| b as usize != n && b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                "best_of is supported only equal to n (or 1)",
            ));
        }
        if self.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.logit_bias.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        if self.tools.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return Err(ApiError::invalid(
                "tools",
                "tool calling is not supported by this server",
            ));
        }
        if self.functions.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return Err(ApiError::invalid(
                "functions",
                "function calling is not supported by this server",
            ));
        }
        let plain_choice = |v: &serde_json::Value| {
            is_empty_value(v) || v.as_str().is_some_and(|c| c == "none" || c == "auto")
        };
        if self.tool_choice.as_ref().is_some_and(|v| !plain_choice(v)) {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool calling is not supported by this server: tool_choice may only be \"none\" \
                 or \"auto\"",
            ));
        }
        if self
            .function_call
            .as_ref()
            .is_some_and(|v| !plain_choice(v))
        {
            return Err(ApiError::invalid(
                "function_call",
                "function calling is not supported by this server",
            ));
        }
        let constraint = self.constraint()?;
        let logprobs = self.logprobs()?;
        let (param, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max {
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    param,
                    format!("{param} must be at least 1, got {m}"),
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        // What a request leaves out takes the defaults every entry point shares.
        let d = SamplingParams::default();
        let temperature =
            range("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(d.temperature);
        let top_p = range("top_p", self.top_p, 0.0, 1.0)?.unwrap_or(d.top_p);
        if top_p == 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
        }
        let min_p = range("min_p", self.min_p, 0.0, 1.0)?.unwrap_or(d.min_p);
        let presence_penalty = range("presence_penalty", self.presence_penalty, -2.0, 2.0)?
            .unwrap_or(d.presence_penalty);
        let frequency_penalty = range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?
            .unwrap_or(d.frequency_penalty);
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    "top_k must be 0 (off) or positive",
                ))
            }
            Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
            None => d.top_k,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(ApiError::invalid("stop", "at most 4 stop sequences"))
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(Checked {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                // OpenAI seeds are signed; the bit pattern is as good a seed as any. No seed:
                // a random one, drawn here so the request's log line can name it.
                seed: Some(self.seed.map_or_else(rand::random, |s| s as u64)),
                min_p,
                presence_penalty,
                frequency_penalty,
                ..d
            },
            stop,
            stream: self.stream,
            n,
            logprobs,
            constraint,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl CommonParams {
    /// `response_format` as a constraint (`None` for text).
    fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let Some(f) = self.response_format.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = |m: &str| Err(ApiError::invalid("response_format", m));
        match f.get("type").and_then(|t| t.as_str()) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Constraint::JsonObject)),
            Some("json_schema") => match f.get("json_schema").and_then(|j| j.get("schema")) {
                Some(s) if s.is_object() || s.is_boolean() => {
                    Ok(Some(Constraint::JsonSchema(s.clone())))
                }
                _ => bad(
                    "response_format json_schema needs json_schema.schema, a JSON schema object",
                ),
            },
            Some(other) => Err(ApiError::invalid(
                "response_format",
                format!(
                    "unknown response_format type {other:?}: expected \"text\", \"json_object\" \
                     or \"json_schema\""
                ),
            )),
            None => bad("response_format must be an object with a \"type\""),
        }
    }

    /// `logprobs` (a bool with `top_logprobs` in chat, a count in completions) as the number of
    /// alternatives per token, `None` when off.
    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let max = rocmforge::sample::MAX_TOP_LOGPROBS as i64;
        let count = |param: &str, k: i64| {
            if (0..=max).contains(&k) {
                Ok(k as usize)
            } else {
                Err(ApiError::invalid(
                    param,
                    format!("{param} must be between 0 and {max}, got {k}"),
                ))
            }
        };
        let top = self
            .top_logprobs
            .map(|k| count("top_logprobs", k))
            .transpose()?;
        use serde_json::Value;
        match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => match top {
                Some(k) if k > 0 => Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                )),
                _ => Ok(None),
            },
            Some(Value::Bool(true)) => Ok(Some(top.unwrap_or(0))),
            Some(Value::Number(k)) => match k.as_i64() {
                Some(k) => count("logprobs", k).map(Some),
                None => Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be an integer, got {k}"),
                )),
            },
            Some(other) => Err(ApiError::invalid(
                "logprobs",
                format!(
                    "logprobs must be a boolean (chat) or an integer (completions), got {other}"
                ),
            )),
        }
    }
}

/// The roles a chat message may have. Anything else is a 400: templates branch on the role, and
/// a role string is copied into the prompt as is.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

impl ChatRequest {
    /// The turns as the chat template wants them (text parts joined, roles checked).
    pub fn turns(&self) -> Result<Vec<rocmforge::tokenizer::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!(
                            "unknown role {:?}; expected one of {}",
                            m.role,
                            ROLES.join(", ")
                        ),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        &format!("messages[{i}].content"),
                                        format!(
                                            "content part of type {:?} is not supported",
                                            p.kind
                                        ),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                Ok(rocmforge::tokenizer::ChatMessage::new(
                    m.role.clone(),
                    content,
                ))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}
