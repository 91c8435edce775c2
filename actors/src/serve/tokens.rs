//! `POST /tokenize` and `POST /detokenize` in llama.cpp server's shape: the model's own
//! tokenizer, so a client can count tokens or build token prompts exactly as the server will.

use super::error::ApiError;
use super::AppState;
use serde::Deserialize;
use serde_json::{json, Value};

/// `{"content": "...", "add_special": false, "parse_special": true, "with_pieces": false}`.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    /// Add BOS/EOS as the model's metadata says (llama.cpp's default: no).
    #[serde(default)]
    pub add_special: bool,
    /// Special-token text (`<|im_start|>`) becomes that token (llama.cpp's default: yes).
    #[serde(default = "yes")]
    pub parse_special: bool,
    /// Each token as `{"id", "piece"}`: the piece a string when its bytes are UTF-8, else the
    /// list of byte values (a token inside a multi-byte character).
    #[serde(default)]
    pub with_pieces: bool,
}

fn yes() -> bool {
    true
}

/// `{"tokens": [ids]}`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// The tokens of `req.content`, as the response body.
pub async fn tokenize(s: &AppState, req: TokenizeRequest) -> Result<Value, ApiError> {
    if req.content.len() > s.max_prompt_bytes {
        return Err(ApiError::invalid(
            "content",
            format!(
                "the content has {} bytes; this server takes at most {}",
                req.content.len(),
                s.max_prompt_bytes
            ),
        ));
    }
    let tok = s.tokenizer.clone();
    // Encoding a long text takes a while: off the async threads.
    tokio::task::spawn_blocking(move || {
        let ids = tok
            .encode(&req.content, req.add_special, req.parse_special)
            .map_err(|e| ApiError::invalid("content", format!("cannot tokenize: {e}")))?;
        if !req.with_pieces {
            return Ok(json!({ "tokens": ids }));
        }
        let tokens: Vec<Value> = ids
            .iter()
            .map(|&id| {
                let bytes = tok.token_bytes(id).unwrap_or_default();
                let piece = match std::str::from_utf8(bytes) {
                    Ok(t) => json!(t),
                    Err(_) => json!(bytes),
                };
                json!({"id": id, "piece": piece})
            })
            .collect();
        Ok(json!({ "tokens": tokens }))
    })
    .await
    .map_err(ApiError::internal)?
}

/// The text of `req.tokens` (special tokens as their text), as the response body.
pub fn detokenize(s: &AppState, req: &DetokenizeRequest) -> Result<Value, ApiError> {
    let content = s
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(json!({ "content": content }))
}
