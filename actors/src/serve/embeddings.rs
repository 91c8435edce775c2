//! `POST /v1/embeddings`: each input's final hidden states (after the output norm) pooled as the
//! model's metadata says (`{arch}.pooling_type`; mean for a decoder LM without it) and
//! L2-normalized, through `RuntimeHandle::embed`.

use super::error::ApiError;
use super::AppState;
use crate::messages::Pooling;
use base64::Engine;
use rocmforge::gguf::Metadata;
use rocmforge::model::{arch_key, ArchKey};
use serde::Deserialize;
use serde_json::{json, Value};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// `input`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32 bytes; the openai client's default).
    pub encoding_format: Option<String>,
    /// Shortening the vector is not supported: only the model's width is accepted.
    pub dimensions: Option<i64>,
}

/// The pooling the model's metadata names, and where the choice came from (for the log).
pub fn model_pooling(md: &Metadata) -> (Pooling, String) {
    let arch = md.architecture().unwrap_or("");
    let key = arch_key(arch, ArchKey::PoolingType);
    match md.get_u64(&key) {
        Ok(Some(t)) => match Pooling::from_gguf(t) {
            Some(p) => (p, format!("{key} = {t}")),
            None => (
                Pooling::Mean,
                format!("{key} = {t} has no single vector: mean"),
            ),
        },
        _ => (
            Pooling::Mean,
            format!("no {key}: mean, the default for a decoder LM"),
        ),
    }
}

impl EmbeddingRequest {
    /// Whether the vectors go out as base64 (a 400 for an unknown format).
    pub fn base64(&self) -> Result<bool, ApiError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(false),
            Some("base64") => Ok(true),
            Some(other) => Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            )),
        }
    }
}

/// The response body for `vectors` (one per input, in order) and `prompt_tokens` in total.
pub fn body(s: &AppState, vectors: &[Vec<f32>], prompt_tokens: usize, base64: bool) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": s.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}
