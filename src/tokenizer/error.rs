//! Errors of the tokenizer: bad metadata, unknown variants, bad ids, template failures.

use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key had the wrong type or a required key was missing.
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    #[error("tokenizer metadata: required key `{0}` is missing")]
    MissingKey(&'static str),
    #[error(
        "tokenizer metadata: `{key}` has {found} entries, expected {expected} (one per token)"
    )]
    LengthMismatch {
        key: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("tokenizer metadata: `{key}` = {id} is not a token id (vocabulary size {vocab_size})")]
    SpecialIdOutOfRange {
        key: &'static str,
        id: u64,
        vocab_size: usize,
    },
    #[error("tokenizer metadata: merge #{index} `{merge}` is not two space-separated symbols")]
    BadMerge { index: usize, merge: String },
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    UnknownModel(String),
    #[error(
        "unknown pre-tokenizer `{0}` for a byte-level BPE vocabulary (supported: {supported})",
        supported = crate::tokenizer::pretok::SUPPORTED_NAMES
    )]
    UnknownPreTokenizer(String),
    #[error("tokenizer vocabulary is empty")]
    EmptyVocab,
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("the BOS/EOS token is requested by the metadata but `{0}` is not set")]
    MissingSpecial(&'static str),
    #[error("a byte of the text has no token (no `<0x{byte:02X}>` and no unknown token)")]
    NoByteToken { byte: u8 },
    #[error("pre-tokenizer regex failed on the input: {0}")]
    Regex(String),
    #[error("the model has no chat template (`tokenizer.chat_template`)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
}
