//! Errors of model loading and the forward pass. Each variant carries what a user needs to find
//! the problem: the key, the tensor, the shapes, the limits.

use crate::gguf::GgufError;
use crate::quant::{GgmlType, QuantError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // --- loading
    #[error("unsupported architecture {arch:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture { arch: String },
    #[error("hyper-parameter {key}: {reason}")]
    BadHParam { key: String, reason: String },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name} has type {ty}, which the CPU backend cannot compute with")]
    UnsupportedTensorType { name: String, ty: GgmlType },
    #[error("tensor {name} in the file is not used by the {arch} forward pass")]
    UnusedTensor { name: String, arch: String },
    #[error("metadata: {0}")]
    Gguf(#[from] GgufError),

    // --- running
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("context overflow: {needed} tokens needed, the context holds {ctx}")]
    ContextOverflow { needed: usize, ctx: usize },
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("{op} on tensor {tensor}: {source}")]
    Kernel {
        op: &'static str,
        tensor: String,
        #[source]
        source: QuantError,
    },
    #[error("cannot build a thread pool: {0}")]
    ThreadPool(String),
}
