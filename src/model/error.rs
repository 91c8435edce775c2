//! Errors of model loading and the forward pass. Each variant carries what a user needs to find
//! the problem: the key, the tensor, the shapes, the limits.

use crate::gguf::GgufError;
use crate::quant::{GgmlType, QuantError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // --- loading
    #[error(
        "unsupported architecture {arch:?} (supported: llama, mistral, qwen2, qwen3, gemma3, \
         phi3, qwen3moe, qwen2moe)"
    )]
    UnsupportedArchitecture { arch: String },
    /// A supported architecture with a variant the forward pass does not compute.
    #[error("{arch}: {what} is not supported")]
    UnsupportedFeature { arch: String, what: String },
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
    /// Token list, embedding rows, output rows and `vocab_size` disagree in a way no padding
    /// explains: the tokenizer would emit ids the model has no row for (or the reverse).
    #[error(
        "vocabulary mismatch: {of} is {found}, but token_embd.weight has {embd_rows} rows ({rule})"
    )]
    VocabMismatch {
        /// What disagrees with the embedding table (`tokenizer.ggml.tokens`, `output.weight`, ...).
        of: String,
        found: usize,
        embd_rows: usize,
        /// The rule broken, for the user who has to fix the file.
        rule: &'static str,
    },

    // --- memory (sized by the file or a request)
    #[error(
        "a KV cache of {ctx} tokens needs {bytes} bytes ({per_token} per token), over the limit of \
         {limit} bytes ({limit_from}); not even {min_ctx} tokens fit: use a smaller --ctx, raise \
         the limit (RuntimeBuilder::kv_limit; the CLI reads ROCMFORGE_KV_LIMIT) or a model with fewer layers/KV heads"
    )]
    KvTooLarge {
        ctx: usize,
        bytes: u128,
        per_token: u128,
        limit: u64,
        limit_from: String,
        min_ctx: usize,
    },
    #[error("cannot allocate {what}: {bytes} bytes")]
    Alloc { what: &'static str, bytes: u128 },

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

    // --- batching and the paged KV cache
    #[error(
        "batch of {sequences} sequences with rows {rows:?} does not match {values} hidden values \
         of width {width}"
    )]
    BatchShape {
        rows: Vec<usize>,
        sequences: usize,
        values: usize,
        width: usize,
    },
    #[error("the sequences of one batch must share one precision")]
    BatchPrecision,
    #[error(
        "the KV pool is full: {needed} more blocks of {block_tokens} tokens needed, {free} of \
         {total} free"
    )]
    KvPoolFull {
        needed: usize,
        free: usize,
        total: usize,
        block_tokens: usize,
    },
    #[error("the KV pool's blocks are on a GPU: the host cannot store rows into them")]
    KvPoolOnDevice,
}
