//! Chat templates (`tokenizer.chat_template`, Jinja) rendered with `minijinja`.
//!
//! Rendered as transformers does: `trim_blocks` and `lstrip_blocks` on, the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and `raise_exception(msg)`.
//! The Python string and dict methods templates commonly call (`strip`, `startswith`, `items`,
//! ...) are provided through minijinja's unknown-method hook.

use super::error::TokenizerError;
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.set_unknown_method_callback(python_method);
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| TokenizerError::Template(format!("parse: {e:#}")))?;
    tmpl.render(minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| TokenizerError::Template(format!("render: {e:#}")))
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
