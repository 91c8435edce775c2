//! Tool calls (OpenAI's `tools` / `tool_choice`): the checked function definitions, the grammar
//! that constrains a reply to calls whose arguments follow each function's JSON schema, the
//! reply parsed back into calls (whole, or piece by piece while streaming), and the text a chat
//! template that knows nothing about tools is given instead.
//!
//! **One call format**, the Hermes one (Qwen 2/2.5/3, Hermes, SmolLM3 are trained on it):
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! A template that renders `tools` itself (the model was trained for tools) gets them as
//! transformers passes them; a template that ignores them gets [`system_prompt`] in the system
//! message, which describes this format. A model trained on another format (Llama 3.1's bare
//! JSON, Mistral's `[TOOL_CALLS]`) is still held to this one where the grammar forces a call
//! (`required` or a named function); under `auto` its own format would come back as text.
//!
//! **The grammar** (`llguidance`'s Lark syntax, one `%json` schema per function:
//! `{"name": const, "arguments": parameters}`):
//! - `required`: one call, or with parallel calls one or more separated by a newline;
//! - a named function: exactly one call of it;
//! - `auto`: any text, but once the text `<tool_call>` appears it must go on as a whole call (a
//!   lazy lexeme ends the free text at the marker, llguidance's tool-call idiom); text and calls
//!   may alternate (without parallel calls: one call, and the text after it never holds the
//!   marker). So a reply is either plain text or carries calls that parse, and nothing is spent
//!   on calls the model does not start.

use serde_json::{json, Map, Value};

/// Opens and closes one call in the reply.
pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// One function a client declared.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema (`{"type": "object", "properties": {}}` when left out).
    pub parameters: Value,
}

/// What the reply may or must be (`tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text only; the tools are not shown to the model.
    None,
    /// Text, or calls.
    Auto,
    /// At least one call.
    Required,
    /// Exactly one call of this function.
    Function(String),
}

/// A tool definition or choice that cannot be used, naming where it is (`tools[1].function.name`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ToolError {
    pub param: String,
    pub message: String,
}

fn bad(param: impl Into<String>, message: impl Into<String>) -> ToolError {
    ToolError {
        param: param.into(),
        message: message.into(),
    }
}

/// Most functions one request may declare (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A function name as OpenAI allows it: 1 to 64 of `a-z A-Z 0-9 _ -`. Keeping to it also keeps
/// names out of reach of JSON and grammar quoting.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The `tools` array of a request, checked: each `{"type": "function", "function": {"name",
/// "description"?, "parameters"?}}`, names valid and unique, parameters a schema object.
pub fn parse_tools(v: &Value) -> Result<Vec<FunctionSpec>, ToolError> {
    let list = v
        .as_array()
        .ok_or_else(|| bad("tools", "tools must be an array of function definitions"))?;
    if list.len() > MAX_TOOLS {
        return Err(bad("tools", format!("at most {MAX_TOOLS} tools")));
    }
    let mut out: Vec<FunctionSpec> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        let kind = t.get("type").and_then(Value::as_str);
        if kind != Some("function") {
            return Err(bad(
                at(".type"),
                format!(
                    "only \"function\" tools are supported, got {}",
                    show(t.get("type"))
                ),
            ));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| bad(at(".function"), "missing the function object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(at(".function.name"), "missing the function name"))?;
        if !valid_name(name) {
            return Err(bad(
                at(".function.name"),
                format!("{name:?} is not a valid name: 1 to 64 of a-z, A-Z, 0-9, _ and -"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(bad(
                at(".function.name"),
                format!("two tools are named {name:?}"),
            ));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad(at(".function.description"), "must be a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(
                    at(".function.parameters"),
                    "must be a JSON schema object",
                ))
            }
        };
        out.push(FunctionSpec {
            name: name.to_string(),
            description,
            parameters,
        });
    }
    Ok(out)
}

fn show(v: Option<&Value>) -> String {
    v.map_or_else(|| "nothing".to_string(), Value::to_string)
}

/// `tool_choice` (`"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name"}}`); left out: `auto` with tools, `none` without.
pub fn parse_choice(v: Option<&Value>, tools: &[FunctionSpec]) -> Result<ToolChoice, ToolError> {
    let choice = match v {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "unknown tool_choice {other:?}: expected \"none\", \"auto\", \
                         \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ))
            }
        },
        Some(o @ Value::Object(_)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": \
                         {\"name\": ...}}",
                    )
                })?;
            ToolChoice::Function(name.to_string())
        }
        Some(other) => {
            return Err(bad(
                "tool_choice",
                format!("tool_choice must be a string or an object, got {other}"),
            ))
        }
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Function(_) if tools.is_empty() => Err(bad(
            "tool_choice",
            "tool_choice asks for a tool call, but the request declares no tools",
        )),
        ToolChoice::Function(n) if !tools.iter().any(|t| &t.name == n) => Err(bad(
            "tool_choice",
            format!("tool_choice names {n:?}, which is not among the request's tools"),
        )),
        _ => Ok(choice),
    }
}

/// The JSON schema of one call of `f`: `{"name": f.name, "arguments": <parameters>}`, in that
/// order. The parameters' `$defs`/`definitions` move to the root, where their `#/$defs/...`
/// references point once the parameters are nested.
pub fn call_schema(f: &FunctionSpec) -> Value {
    let mut params = f.parameters.clone();
    let mut root = Map::new();
    root.insert("type".into(), json!("object"));
    if let Some(p) = params.as_object_mut() {
        for key in ["$defs", "definitions"] {
            if let Some(d) = p.remove(key) {
                root.insert(key.into(), d);
            }
        }
    }
    root.insert(
        "properties".into(),
        json!({"name": {"const": f.name}, "arguments": params}),
    );
    root.insert("required".into(), json!(["name", "arguments"]));
    root.insert("additionalProperties".into(), json!(false));
    // One space after `,` and `:`, no other whitespace: as `response_format` (grammar.rs).
    root.insert(
        "x-guidance".into(),
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Value::Object(root)
}

/// A Lark string literal of `s` (JSON string escapes, which llguidance's Lark reads).
fn lit(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The llguidance grammar for `choice` over `tools`; `None` where nothing is constrained
/// (`none`, or no tools).
pub fn grammar(tools: &[FunctionSpec], choice: &ToolChoice, parallel: bool) -> Option<String> {
    let funcs: Vec<&FunctionSpec> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Function(n) => tools.iter().filter(|t| &t.name == n).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    if funcs.is_empty() {
        return None;
    }
    let mut g = String::new();
    let body: Vec<String> = (0..funcs.len()).map(|i| format!("f{i}")).collect();
    let (open, close) = (lit(&format!("{OPEN}\n")), lit(&format!("\n{CLOSE}")));
    match choice {
        ToolChoice::Auto if !parallel => {
            // One call at most: after it, text that never contains the marker.
            g.push_str("start: TEXT | call TAIL\n");
            g.push_str("TEXT: /(?s:.*)/\n");
            g.push_str(&format!(
                "TAIL: /(?s:.*)/ & ~/(?s:.*){}(?s:.*)/\n",
                regex_syntax::escape(OPEN)
            ));
            g.push_str(&format!("call_head[lazy]: TEXT {}\n", lit(OPEN)));
            g.push_str(&format!("call: call_head \"\\n\" body {close}\n"));
        }
        ToolChoice::Auto => {
            g.push_str("start: call* TEXT\n");
            g.push_str("TEXT: /(?s:.*)/\n");
            // The free text ends lazily at the marker: after it, only a call may follow.
            g.push_str(&format!("call_head[lazy]: TEXT {}\n", lit(OPEN)));
            g.push_str(&format!("call: call_head \"\\n\" body {close}\n"));
        }
        ToolChoice::Required if parallel => {
            g.push_str("start: call (\"\\n\" call)*\n");
            g.push_str(&format!("call: {open} body {close}\n"));
        }
        _ => {
            g.push_str("start: call\n");
            g.push_str(&format!("call: {open} body {close}\n"));
        }
    }
    g.push_str(&format!("body: {}\n", body.join(" | ")));
    for (name, f) in body.iter().zip(&funcs) {
        g.push_str(&format!("{name}: %json {}\n", call_schema(f)));
    }
    Some(g)
}

/// The instructions a template that ignores `tools` gets at the end of its system message:
/// the functions (as the request declared them, one JSON object a line) and the call format.
pub fn system_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to help with the user's request. \
         The functions are described in JSON within <tools></tools> tags:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, reply with a JSON object holding its name and its \
         arguments within <tool_call></tool_call> tags, one call per block:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <arguments-json-object>}\n</tool_call>",
    );
    s
}

/// A past call as the model writes it (for templates that ignore `tool_calls`).
pub fn call_text(name: &str, arguments: &Value) -> String {
    format!(
        "{OPEN}\n{}\n{CLOSE}",
        json!({"name": name, "arguments": arguments})
    )
}

/// A tool's result as the model is shown it (for templates that ignore the `tool` role).
pub fn response_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A reply split into its text and its calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedReply {
    /// The text outside the calls, trimmed; `None` when nothing is left.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// The call inside one `<tool_call>` block, if it is one.
fn parse_call(inner: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        // A model that writes the arguments as a string of JSON: that string is the text.
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// A whole reply: every complete block that holds a call becomes one; everything else
/// (text around the blocks, an unfinished block) is the content.
pub fn parse(text: &str) -> ParsedReply {
    let mut s = CallStream::default();
    let mut out = ParsedReply::default();
    let mut content = String::new();
    for ev in s.push(text).into_iter().chain(s.finish()) {
        match ev {
            StreamEvent::Text(t) => content.push_str(&t),
            StreamEvent::Call(c) => out.calls.push(c),
        }
    }
    out.content = (!content.is_empty()).then_some(content);
    out
}

/// What [`CallStream`] lets out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Text(String),
    Call(ToolCall),
}

/// Splits a reply into text and calls as it arrives: text that might begin a marker is held
/// until it is known not to, a block until it closes; whitespace at either end of the content is
/// dropped (held until text follows). The events of a reply in any pieces equal [`parse`]'s.
#[derive(Debug, Default)]
pub struct CallStream {
    /// Received and not yet let out.
    buf: String,
    /// Inside a block (its opening marker is in `buf`).
    in_call: bool,
    /// Some text was let out already (later whitespace is inner, kept).
    started: bool,
    /// Whitespace held back: it is let out only when text follows it.
    pending_ws: String,
}

impl CallStream {
    pub fn push(&mut self, piece: &str) -> Vec<StreamEvent> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else {
                    break;
                };
                let block = self.buf[..end + CLOSE.len()].to_string();
                self.buf.drain(..block.len());
                self.in_call = false;
                match parse_call(&block[OPEN.len()..end]) {
                    Some(c) => out.push(StreamEvent::Call(c)),
                    None => self.text(&block, &mut out),
                }
                continue;
            }
            if let Some(at) = self.buf.find(OPEN) {
                let before = self.buf[..at].to_string();
                self.text(&before, &mut out);
                self.buf.drain(..at);
                self.in_call = true;
                continue;
            }
            // Hold back the longest end of `buf` that begins the marker.
            let keep = (1..OPEN.len())
                .rev()
                .find(|&k| self.buf.ends_with(&OPEN[..k]))
                .unwrap_or(0);
            let safe = self.buf[..self.buf.len() - keep].to_string();
            self.text(&safe, &mut out);
            self.buf.drain(..safe.len());
            break;
        }
        out
    }

    /// The end of the reply: what is held back (an unfinished block included) is text.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        self.in_call = false;
        self.text(&rest, &mut out);
        out
    }

    fn text(&mut self, t: &str, out: &mut Vec<StreamEvent>) {
        if t.is_empty() {
            return;
        }
        let body = t.trim_end();
        let trailing = &t[body.len()..];
        if body.is_empty() {
            if self.started {
                self.pending_ws.push_str(trailing);
            }
            return;
        }
        let mut s = std::mem::take(&mut self.pending_ws);
        s.push_str(if self.started {
            body
        } else {
            body.trim_start()
        });
        self.started = true;
        self.pending_ws.push_str(trailing);
        out.push(StreamEvent::Text(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<FunctionSpec> {
        parse_tools(
            &json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]),
        )
        .unwrap()
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let cases = [
            (json!({}), "tools"),
            (json!([{"type": "code"}]), "tools[0].type"),
            (json!([{"type": "function"}]), "tools[0].function"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}},
                       {"type": "function", "function": {"name": "f"}}]),
                "tools[1].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                "tools[0].function.parameters",
            ),
        ];
        for (v, param) in cases {
            assert_eq!(parse_tools(&v).unwrap_err().param, param, "{v}");
        }
    }

    #[test]
    fn choices() {
        let t = weather();
        assert_eq!(parse_choice(None, &t).unwrap(), ToolChoice::Auto);
        assert_eq!(parse_choice(None, &[]).unwrap(), ToolChoice::None);
        assert_eq!(
            parse_choice(Some(&json!("required")), &t).unwrap(),
            ToolChoice::Required
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(
            parse_choice(Some(&named), &t).unwrap(),
            ToolChoice::Function("get_weather".into())
        );
        let other = json!({"type": "function", "function": {"name": "nope"}});
        assert!(parse_choice(Some(&other), &t).is_err());
        assert!(parse_choice(Some(&json!("required")), &[]).is_err());
        assert!(parse_choice(Some(&json!("sometimes")), &t).is_err());
        assert_eq!(grammar(&t, &ToolChoice::None, true), None);
    }

    #[test]
    fn call_schema_hoists_definitions() {
        let f = FunctionSpec {
            name: "f".into(),
            description: None,
            parameters: json!({"type": "object", "$defs": {"c": {"type": "string"}},
                               "properties": {"x": {"$ref": "#/$defs/c"}}}),
        };
        let s = call_schema(&f);
        assert_eq!(s["$defs"]["c"]["type"], "string");
        assert!(s["properties"]["arguments"].get("$defs").is_none());
        assert_eq!(s["properties"]["name"]["const"], "f");
    }

    #[test]
    fn parses_calls_and_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \
                    \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>\n";
        let r = parse(text);
        assert_eq!(r.content.as_deref(), Some("Let me check."));
        assert_eq!(
            r.calls,
            vec![
                ToolCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    name: "f".into(),
                    arguments: r#"{"a": 1}"#.into()
                },
            ]
        );
        // No calls; an unfinished or broken block stays text.
        assert_eq!(parse("  hi  ").content.as_deref(), Some("hi"));
        let cut = "<tool_call>\n{\"name\": \"get_w";
        assert_eq!(parse(cut).content.as_deref(), Some(cut));
        assert!(parse(cut).calls.is_empty());
        let broken = "<tool_call>not json</tool_call>";
        assert_eq!(parse(broken).content.as_deref(), Some(broken));
        assert_eq!(parse("\n\n").content, None);
    }

    #[test]
    fn streaming_in_any_pieces_equals_the_whole() {
        let text = " a <tool_c x <tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n\
                    </tool_call> \n b\n<tool_call>{\"name\"";
        let whole = parse(text);
        for size in 1..text.len() {
            let mut s = CallStream::default();
            let mut content = String::new();
            let mut calls = Vec::new();
            let mut rest = text;
            let mut evs = Vec::new();
            while !rest.is_empty() {
                let mut k = size.min(rest.len());
                while !rest.is_char_boundary(k) {
                    k += 1;
                }
                evs.extend(s.push(&rest[..k]));
                rest = &rest[k..];
            }
            evs.extend(s.finish());
            for e in evs {
                match e {
                    StreamEvent::Text(t) => content.push_str(&t),
                    StreamEvent::Call(c) => calls.push(c),
                }
            }
            assert_eq!(content, whole.content.clone().unwrap_or_default(), "{size}");
            assert_eq!(calls, whole.calls, "{size}");
        }
        assert_eq!(whole.calls.len(), 1);
        assert!(whole.content.unwrap().starts_with("a <tool_c x"));
    }
}
