//! Log-probabilities in OpenAI's two shapes: chat's `logprobs.content[]` entries
//! (`{token, logprob, bytes, top_logprobs[]}`) and the legacy completions object (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`).
//!
//! The numbers are the runtime's (`TokenLogprobs`: the log-softmax of the raw logits). An
//! end-of-generation token that ended the reply is left out, as it is out of the text.

use crate::messages::TokenLogprobs;
use rocmforge::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// A token as text (lossy where it is part of a multi-byte character) and its raw bytes.
fn piece(tok: &Tokenizer, id: u32) -> (String, &[u8]) {
    let bytes = tok.token_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(bytes).into_owned(), bytes)
}

fn shown<'a>(
    tok: &'a Tokenizer,
    steps: &'a [TokenLogprobs],
) -> impl Iterator<Item = &'a TokenLogprobs> {
    steps.iter().filter(|lp| !tok.is_eog(lp.token))
}

/// Chat: the `logprobs.content` entries of `steps`.
pub fn chat_content(tok: &Tokenizer, steps: &[TokenLogprobs]) -> Vec<Value> {
    shown(tok, steps)
        .map(|lp| {
            let (text, bytes) = piece(tok, lp.token);
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (t, b) = piece(tok, id);
                    json!({"token": t, "logprob": l, "bytes": b})
                })
                .collect();
            json!({"token": text, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
        })
        .collect()
}

/// Completions: the `logprobs` object, one per response or per streamed chunk; `text_offset`
/// counts characters from the start of the completion across chunks.
#[derive(Debug, Default)]
pub struct CompletionLogprobs {
    offset: usize,
}

impl CompletionLogprobs {
    /// The echoed prompt's entries (`echo`): every prompt token, end-of-generation ones too (they
    /// are in the prompt); a token without log-probabilities (the first) has `null`s.
    pub fn render_prompt(
        &mut self,
        tok: &Tokenizer,
        steps: &[(u32, Option<TokenLogprobs>)],
    ) -> Value {
        let (mut tokens, mut token_logprobs, mut top_logprobs, mut text_offset) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, lp) in steps {
            let (text, _) = piece(tok, *id);
            text_offset.push(self.offset);
            self.offset += text.chars().count();
            tokens.push(text);
            match lp {
                None => {
                    token_logprobs.push(Value::Null);
                    top_logprobs.push(Value::Null);
                }
                Some(lp) => {
                    token_logprobs.push(json!(lp.logprob));
                    top_logprobs.push(top_map(tok, lp));
                }
            }
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }

    pub fn render(&mut self, tok: &Tokenizer, steps: &[TokenLogprobs]) -> Value {
        let (mut tokens, mut token_logprobs, mut top_logprobs, mut text_offset) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for lp in shown(tok, steps) {
            let (text, _) = piece(tok, lp.token);
            text_offset.push(self.offset);
            self.offset += text.chars().count();
            tokens.push(text);
            token_logprobs.push(lp.logprob);
            top_logprobs.push(top_map(tok, lp));
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }
}

/// The alternatives as a map from token text: two ids with the same text keep the likelier one
/// (the first, as `top` is most likely first).
fn top_map(tok: &Tokenizer, lp: &TokenLogprobs) -> Value {
    let mut top = Map::new();
    for &(id, l) in &lp.top {
        top.entry(piece(tok, id).0).or_insert(json!(l));
    }
    Value::Object(top)
}
