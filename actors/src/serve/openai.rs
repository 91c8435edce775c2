//! OpenAI request and response bodies, and the checks that turn a request into a `Job` plan.
//!
//! Fields are typed (a string where a number belongs is a 400 naming the field); fields this
//! server does not implement are ignored when harmless and rejected when they change the answer
//! (`logit_bias`, the legacy `functions`/`function_call`).

use super::error::ApiError;
use crate::messages::{Constraint, SamplingParams};
use rocmforge::tool_calls::{self, FunctionSpec, ToolChoice};
use serde::{Deserialize, Serialize};
use serde_json::json;

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
    /// Completions: generate this many (>= `n`) and return the `n` likeliest.
    pub best_of: Option<i64>,
    /// Completions: the prompt in front of the text (and its log-probabilities).
    #[serde(default)]
    pub echo: bool,
    /// Not implemented: rejected unless empty, since ignoring it changes the answer silently.
    pub logit_bias: Option<serde_json::Value>,
    /// Chat: the functions the model may call (`tool_calls.rs`); completions: rejected.
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one reply (default true).
    pub parallel_tool_calls: Option<bool>,
    /// The legacy names of `tools` and `tool_choice`: rejected unless empty.
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name": ..., "schema": {...}}}`.
    pub response_format: Option<serde_json::Value>,
    /// A grammar the output must follow, as llama.cpp's server takes it: GBNF, or llguidance's
    /// Lark syntax when it starts with `%llguidance`.
    pub grammar: Option<String>,
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
    /// An assistant turn's calls, as a reply gave them.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A past call sent back in an assistant message.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// A JSON text (OpenAI's shape); an object is taken too.
    pub arguments: serde_json::Value,
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
    /// `response_format` or `grammar` as a constraint on the output (`None`: plain text).
    pub constraint: Option<Constraint>,
    /// The field the constraint came from (named in a compile error).
    pub constraint_param: &'static str,
    /// Sequences to generate (>= `n`; the `n` with the highest cumulative log-probability are
    /// returned).
    pub best_of: usize,
    pub echo: bool,
    /// `max_tokens: 0`: nothing is generated (with `echo`, scoring a prompt).
    pub max_tokens_zero: bool,
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
        // As OpenAI: best_of >= n, not with stream (the ranking needs every sequence whole).
        let best_of = match self.best_of {
            None => n,
            Some(b) if b < n as i64 => {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("best_of must be greater than or equal to n ({n}), got {b}"),
                ))
            }
            Some(b) if b > MAX_N => {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("best_of must be at most {MAX_N}, got {b}"),
                ))
            }
            Some(b) => b as usize,
        };
        if best_of > n && self.stream {
            return Err(ApiError::invalid(
                "best_of",
                "best_of cannot be used with stream: the best sequences are known only at the end",
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        if self.functions.as_ref().is_some_and(|v| !is_empty_value(v)) {
            return Err(ApiError::invalid(
                "functions",
                "the legacy functions field is not supported: use tools",
            ));
        }
        let plain_choice = |v: &serde_json::Value| {
            is_empty_value(v) || v.as_str().is_some_and(|c| c == "none" || c == "auto")
        };
        if self
            .function_call
            .as_ref()
            .is_some_and(|v| !plain_choice(v))
        {
            return Err(ApiError::invalid(
                "function_call",
                "the legacy function_call field is not supported: use tool_choice",
            ));
        }
        let (constraint, constraint_param) = self.constraint()?;
        let logprobs = self.logprobs()?;
        let (param, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        // `max_tokens: 0` with `echo` scores the prompt without generating (OpenAI's way).
        let max_tokens_zero = self.echo && max == Some(0);
        let max_tokens = match max {
            Some(0) if max_tokens_zero => Some(0),
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
            constraint_param,
            best_of,
            echo: self.echo,
            max_tokens_zero,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl CommonParams {
    /// `response_format` or `grammar` as a constraint (`None` for text), with the field's name.
    fn constraint(&self) -> Result<(Option<Constraint>, &'static str), ApiError> {
        let format = self.response_format()?;
        match (&self.grammar, format) {
            (None, f) => Ok((f, "response_format")),
            (Some(g), None) if g.trim().is_empty() => Ok((None, "grammar")),
            (Some(g), None) => Ok((Some(Constraint::Grammar(g.clone())), "grammar")),
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "grammar",
                "grammar and a response_format other than text cannot be combined",
            )),
        }
    }

    /// `response_format` as a constraint (`None` for text).
    fn response_format(&self) -> Result<Option<Constraint>, ApiError> {
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

/// The tools of a chat request, checked (`None` in `Checked` when there are none or the choice
/// is `none`).
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub specs: Vec<FunctionSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// The `tools` array as the request wrote it, for the chat template.
    pub declared: Vec<serde_json::Value>,
}

impl ToolPlan {
    /// The constraint on the reply (llguidance's Lark syntax, `tool_calls::grammar`).
    pub fn constraint(&self) -> Option<Constraint> {
        tool_calls::grammar(&self.specs, &self.choice, self.parallel)
            .map(|g| Constraint::Grammar(format!("%llguidance {{}}\n{g}")))
    }
}

impl From<tool_calls::ToolError> for ApiError {
    fn from(e: tool_calls::ToolError) -> Self {
        // The message names the field too: clients often show only the message.
        ApiError::invalid(&e.param, e.to_string())
    }
}

impl ChatRequest {
    /// `tools`, `tool_choice` and `parallel_tool_calls`, checked; `None` when the reply is text
    /// only (no tools, or `tool_choice: "none"`: the tools are then not shown to the model).
    pub fn tool_plan(&self) -> Result<Option<ToolPlan>, ApiError> {
        let c = &self.common;
        let specs = match c.tools.as_ref().filter(|v| !v.is_null()) {
            None => Vec::new(),
            Some(v) => tool_calls::parse_tools(v)?,
        };
        let choice = tool_calls::parse_choice(c.tool_choice.as_ref(), &specs)?;
        if choice == ToolChoice::None || specs.is_empty() {
            return Ok(None);
        }
        if c.response_format
            .as_ref()
            .is_some_and(|f| !f.is_null() && f.get("type").and_then(|t| t.as_str()) != Some("text"))
            || c.grammar.as_ref().is_some_and(|g| !g.trim().is_empty())
        {
            return Err(ApiError::invalid(
                "tool_choice",
                "tools cannot be combined with response_format or grammar (both constrain the \
                 reply); send tool_choice \"none\" to use them without tools",
            ));
        }
        let declared = c
            .tools
            .as_ref()
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(Some(ToolPlan {
            specs,
            choice,
            parallel: c.parallel_tool_calls.unwrap_or(true),
            declared,
        }))
    }

    /// The turns as the chat template wants them (text parts joined, roles checked, past calls
    /// with their arguments as objects, as transformers passes them).
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
                let mut msg = rocmforge::tokenizer::ChatMessage::new(m.role.clone(), content);
                if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                    if m.role != "assistant" {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].tool_calls"),
                            "only assistant messages carry tool_calls",
                        ));
                    }
                    msg.tool_calls = Some(past_calls(i, calls)?);
                }
                // OpenAI requires it; templates rarely read it, so a missing one is accepted.
                msg.tool_call_id = m.tool_call_id.clone();
                msg.name = m.name.clone();
                Ok(msg)
            })
            .collect()
    }
}

/// An assistant message's calls in transformers' shape: `function.arguments` parsed from its
/// JSON text into an object (templates write it with `tojson`); text that is not JSON stays a
/// string.
fn past_calls(i: usize, calls: &[ToolCallIn]) -> Result<serde_json::Value, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for (k, c) in calls.iter().enumerate() {
        if c.kind.as_deref().is_some_and(|t| t != "function") {
            return Err(ApiError::invalid(
                &format!("messages[{i}].tool_calls[{k}].type"),
                "only \"function\" calls are supported",
            ));
        }
        let arguments = match &c.function.arguments {
            serde_json::Value::String(s) => {
                serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
            }
            other => other.clone(),
        };
        let mut call = serde_json::Map::new();
        if let Some(id) = &c.id {
            call.insert("id".into(), json!(id));
        }
        call.insert("type".into(), json!("function"));
        call.insert(
            "function".into(),
            json!({"name": c.function.name, "arguments": arguments}),
        );
        out.push(serde_json::Value::Object(call));
    }
    Ok(serde_json::Value::Array(out))
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
