//! Chat templates (`tokenizer.chat_template`, Jinja) rendered with `minijinja`.
//!
//! Rendered as transformers does: `trim_blocks` and `lstrip_blocks` on, the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and `raise_exception(msg)`.
//! The Python string and dict methods templates commonly call (`strip`, `startswith`, `items`,
//! ...) are provided through minijinja's unknown-method hook.
//!
//! A template is a program, and a server renders it with input a client chose: [`ChatTemplate`]
//! renders under [`TemplateLimits`] (fuel, output bytes, wall time), so a template that loops,
//! grows quadratically with the messages or emits megabytes ends with an error instead of
//! holding a thread.

use super::error::TokenizerError;
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::time::{Duration, Instant};

/// One chat turn. The tool fields are rendered only when set, in the shape transformers gives
/// templates: `tool_calls` as `[{"id", "type": "function", "function": {"name", "arguments":
/// {...}}}]` (arguments an object), `tool_call_id` and `name` on `tool` messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// Bounds on one render. `None` means unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateLimits {
    /// minijinja instructions (about one per expression, tag or loop step). Fuel is what
    /// actually ends a runaway render: the other two limits are only checked when output is
    /// written, and a loop that writes nothing never reaches them.
    pub fuel: Option<u64>,
    /// Bytes of rendered output.
    pub max_output_bytes: Option<usize>,
    /// Wall time, checked on every write of output.
    pub timeout: Option<Duration>,
}

impl TemplateLimits {
    pub const UNLIMITED: TemplateLimits = TemplateLimits {
        fuel: None,
        max_output_bytes: None,
        timeout: None,
    };
}

/// Why a chat template did not render. The first three are the template's or the input's
/// fault in a way a caller may want to tell apart: the input was too big for the limits, the
/// template rejected the input on purpose, or the template itself is broken.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("rendering took more than {fuel} template steps")]
    OutOfFuel { fuel: u64 },
    #[error("the rendered prompt is longer than {limit} bytes")]
    OutputTooLong { limit: usize },
    #[error("rendering took longer than {limit:?}")]
    TimedOut { limit: Duration },
    /// `raise_exception(msg)`: the template refuses these messages (roles out of order, ...).
    #[error("{message}")]
    Raised { message: String },
    /// The template does not parse.
    #[error("cannot parse the chat template: {message}")]
    Parse { message: String },
    /// Any other failure while rendering: a bug in the template (or a method we lack).
    #[error("cannot render the chat template: {message}")]
    Render { message: String },
}

impl From<ChatTemplateError> for TokenizerError {
    fn from(e: ChatTemplateError) -> Self {
        // `TokenizerError::Template` already says "chat template: ".
        TokenizerError::Template(match e {
            ChatTemplateError::Parse { message } => format!("parse: {message}"),
            ChatTemplateError::Render { message } => format!("render: {message}"),
            other => other.to_string(),
        })
    }
}

/// Marks an error as raised by the template's own `raise_exception`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The name templates get in minijinja's error messages (`... (in chat_template:3)`).
const NAME: &str = "chat_template";

/// A chat template parsed once, rendered many times under the same limits.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    limits: TemplateLimits,
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        limits: TemplateLimits,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.set_unknown_method_callback(python_method);
        env.add_filter("tojson", tojson);
        // Fuel is counted per render, from this budget each time.
        env.set_fuel(limits.fuel);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatTemplateError::Parse {
                message: e.to_string(),
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            limits,
        })
    }

    pub fn limits(&self) -> TemplateLimits {
        self.limits
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders with `tools` (the request's list of `{"type": "function", "function": {...}}`),
    /// as transformers passes it; `None` renders `tools` as none, as transformers does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatTemplateError::Render {
                message: e.to_string(),
            })?;
        let mut out = LimitedWriter {
            buf: Vec::new(),
            max: self.limits.max_output_bytes,
            deadline: self.limits.timeout.map(|t| (Instant::now() + t, t)),
            exceeded: None,
        };
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from_serialize(tools),
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        if let Err(e) = tmpl.render_captured_to(ctx, &mut out) {
            return Err(match (out.exceeded, e.kind()) {
                (Some(limit), _) => limit,
                (None, ErrorKind::OutOfFuel) => ChatTemplateError::OutOfFuel {
                    fuel: self.limits.fuel.unwrap_or(0),
                },
                _ => match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Raised>()) {
                    Some(Raised(m)) => ChatTemplateError::Raised { message: m.clone() },
                    // Plain display: the alternate form appends the template source and every
                    // variable (the client's messages) to the message.
                    None => ChatTemplateError::Render {
                        message: e.to_string(),
                    },
                },
            });
        }
        String::from_utf8(out.buf).map_err(|e| ChatTemplateError::Render {
            message: format!("output is not UTF-8: {e}"),
        })
    }
}

/// Collects the output and fails the render once it passes a size or a deadline: the limit
/// stops the template while it writes, before a 100 MB prompt exists.
struct LimitedWriter {
    buf: Vec<u8>,
    max: Option<usize>,
    deadline: Option<(Instant, Duration)>,
    exceeded: Option<ChatTemplateError>,
}

impl std::io::Write for LimitedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(limit) = self.max {
            if self.buf.len() + b.len() > limit {
                self.exceeded = Some(ChatTemplateError::OutputTooLong { limit });
                return Err(std::io::Error::other("chat template output limit"));
            }
        }
        if let Some((at, limit)) = self.deadline {
            if Instant::now() > at {
                self.exceeded = Some(ChatTemplateError::TimedOut { limit });
                return Err(std::io::Error::other("chat template time limit"));
            }
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders once, without limits (the command line's chat, where the user is the client).
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let t = ChatTemplate::new(template, bos_token, eos_token, TemplateLimits::UNLIMITED)?;
    Ok(t.render(messages, add_generation_prompt)?)
}

/// `tojson` as transformers defines it for chat templates (`json.dumps` with
/// `ensure_ascii=False`, optional `indent`): minijinja's own escapes `<`, `>`, `&` and `'` for
/// HTML, which would show a model `\u003c` where it was trained on `<`.
fn tojson(value: &Value, args: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = args.get("indent")?;
    let _: Option<bool> = args.get("ensure_ascii")?;
    let _: Option<bool> = args.get("sort_keys")?;
    args.assert_all_used()?;
    let err = |e: serde_json::Error| Error::new(ErrorKind::InvalidOperation, e.to_string());
    let text = match indent {
        None => serde_json::to_string(value).map_err(err)?,
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut out = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(value, &mut ser).map_err(err)?;
            String::from_utf8(out)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        }
    };
    // `json.dumps` separates with ", " and ": "; serde_json's compact form has no spaces.
    let text = if indent.is_none() {
        python_spacing(&text)
    } else {
        text
    };
    Ok(Value::from_safe_string(text))
}

/// Compact JSON respaced as Python's `json.dumps` writes it (`, ` and `: ` outside strings).
fn python_spacing(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() + compact.len() / 8);
    let (mut in_str, mut escaped) = (false, false);
    for c in compact.chars() {
        out.push(c);
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
        } else if c == ',' || c == ':' {
            out.push(' ');
        }
    }
    out
}

fn str_arg(args: &[Value], i: usize) -> Result<Option<String>, Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "expected a string argument")),
    }
}

/// The Python methods chat templates use, on strings and maps.
fn python_method(_: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        let chars = str_arg(args, 0)?;
        let set = |c: char| {
            chars
                .as_deref()
                .map_or(c.is_whitespace(), |cs| cs.contains(c))
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(set)),
            "lstrip" => Value::from(s.trim_start_matches(set)),
            "rstrip" => Value::from(s.trim_end_matches(set)),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "startswith" => Value::from(s.starts_with(chars.as_deref().unwrap_or(""))),
            "endswith" => Value::from(s.ends_with(chars.as_deref().unwrap_or(""))),
            "replace" => {
                let to = str_arg(args, 1)?.unwrap_or_default();
                Value::from(s.replace(chars.as_deref().unwrap_or(""), &to))
            }
            "split" => match chars.as_deref() {
                None => Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>()),
                Some(sep) => Value::from(s.split(sep).map(Value::from).collect::<Vec<_>>()),
            },
            _ => return Err(Error::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == ValueKind::Map {
        let keys = || -> Result<Vec<Value>, Error> { Ok(value.try_iter()?.collect()) };
        return match method {
            "keys" => Ok(Value::from(keys()?)),
            "values" => Ok(Value::from(
                keys()?
                    .iter()
                    .map(|k| value.get_item(k))
                    .collect::<Result<Vec<_>, _>>()?,
            )),
            "items" => Ok(Value::from(
                keys()?
                    .into_iter()
                    .map(|k| {
                        let v = value.get_item(&k)?;
                        Ok(Value::from(vec![k, v]))
                    })
                    .collect::<Result<Vec<_>, Error>>()?,
            )),
            "get" => {
                let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(fuel: u64, bytes: usize) -> TemplateLimits {
        TemplateLimits {
            fuel: Some(fuel),
            max_output_bytes: Some(bytes),
            timeout: Some(Duration::from_secs(60)),
        }
    }

    fn msgs(n: usize) -> Vec<ChatMessage> {
        (0..n)
            .map(|i| ChatMessage::new("user", format!("m{i}")))
            .collect()
    }

    #[test]
    fn renders_within_limits() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
            "<s>",
            "</s>",
            limits(10_000, 1000),
        )
        .unwrap();
        assert_eq!(t.render(&msgs(2), true).unwrap(), "<s><user>m0<user>m1");
    }

    #[test]
    fn a_loop_that_writes_nothing_runs_out_of_fuel() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "", limits(100_000, 1000)).unwrap();
        let e = t.render(&msgs(1), true).unwrap_err();
        assert!(
            matches!(e, ChatTemplateError::OutOfFuel { fuel: 100_000 }),
            "{e}"
        );
    }

    #[test]
    fn output_past_the_limit_stops_the_render() {
        let src = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "", limits(10_000_000, 1000)).unwrap();
        let e = t.render(&msgs(1), true).unwrap_err();
        assert!(
            matches!(e, ChatTemplateError::OutputTooLong { limit: 1000 }),
            "{e}"
        );
    }

    #[test]
    fn raise_exception_and_template_bugs_are_told_apart() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}",
            "",
            "",
            limits(10_000, 1000),
        )
        .unwrap();
        let e = t.render(&msgs(1), true).unwrap_err();
        assert!(matches!(&e, ChatTemplateError::Raised { message } if message == "system first"));
        let t =
            ChatTemplate::new("{{ messages[0].nope() }}", "", "", limits(10_000, 1000)).unwrap();
        let e = t.render(&msgs(1), true).unwrap_err();
        assert!(matches!(e, ChatTemplateError::Render { .. }), "{e}");
        // The message names the problem once and carries neither the source nor the messages.
        assert!(!e.to_string().contains("m0"), "{e}");
        let e = ChatTemplate::new("{% for %}", "", "", limits(1, 1)).unwrap_err();
        assert!(matches!(e, ChatTemplateError::Parse { .. }), "{e}");
    }

    #[test]
    fn tools_and_tool_calls_reach_the_template_as_transformers_passes_them() {
        let src = "{% if tools %}{{ tools | tojson }}|{% endif %}{% for m in messages %}\
                   {{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}\
                   {% endif %}{{ m.tool_call_id or '' }}{{ m.content }};{% endfor %}\
                   {{ {'k': [1, 'x']} | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, "", "", limits(10_000, 10_000)).unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f",
                                        "description": "a < b & 'c'"}}]);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": {"x": 1}}}]));
        let mut result = ChatMessage::new("tool", "42");
        result.tool_call_id = Some("c1".into());
        let out = t
            .render_with_tools(
                &[ChatMessage::new("user", "hi"), call, result],
                Some(&tools),
                true,
            )
            .unwrap();
        // Python's json.dumps spacing and key order, no HTML escapes; pretty with `indent`.
        assert_eq!(
            out,
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \
             \"description\": \"a < b & 'c'\"}}]|user:hi;assistant:{\"x\": 1};tool:c142;\
             {\n  \"k\": [\n    1,\n    \"x\"\n  ]\n}"
        );
        // Without tools, `tools` is none (falsy) and plain messages carry no tool fields.
        let plain = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
        assert!(plain.starts_with("user:hi;"), "{plain}");
    }
}
