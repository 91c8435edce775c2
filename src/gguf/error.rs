//! Errors of the GGUF reader and writer. Every variant names what was being read (key or
//! tensor) and the byte offset, so a user can find the damage in a hex dump.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // --- the file itself
    #[error("cannot open GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { version: u32 },
    #[error("big-endian GGUF files are not supported (version field reads {raw:#010x})")]
    BigEndian { raw: u32 },
    #[error("file truncated reading {what} at offset {offset}: need {need} bytes, {have} left")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },

    // --- counts and lengths
    #[error("{what} count {count} at offset {offset} exceeds the cap {cap}")]
    TooMany {
        what: String,
        count: u64,
        cap: u64,
        offset: u64,
    },
    #[error("string for {what} at offset {offset} has length {len}, over the cap {cap}")]
    StringTooLong {
        what: String,
        len: u64,
        cap: u64,
        offset: u64,
    },
    #[error("string for {what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },

    // --- metadata
    #[error("unknown metadata value type {ty} for key {key:?} at offset {offset}")]
    UnknownValueType { key: String, ty: u32, offset: u64 },
    #[error("metadata key {key:?}: arrays nested {depth} deep at offset {offset} (cap {cap})")]
    NestingTooDeep {
        key: String,
        depth: usize,
        cap: usize,
        offset: u64,
    },
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("missing metadata key {key:?}")]
    MissingKey { key: String },
    #[error("general.alignment = {value} is invalid (must be a power of two between 1 and {cap})")]
    BadAlignment { value: u64, cap: u64 },

    // --- tensors
    #[error("tensor {tensor:?} at offset {offset}: {n_dims} dimensions (at most {cap})")]
    TooManyDims {
        tensor: String,
        n_dims: u32,
        cap: u32,
        offset: u64,
    },
    #[error("tensor {tensor:?}: bad shape {shape:?}: {reason}")]
    BadShape {
        tensor: String,
        shape: Vec<u64>,
        reason: String,
    },
    #[error("tensor {tensor:?} at offset {offset}: unknown tensor type id {id}")]
    UnknownTensorType {
        tensor: String,
        id: u32,
        offset: u64,
    },
    #[error("tensor {tensor:?}: type {name} was removed from GGML and cannot be read")]
    RemovedTensorType { tensor: String, name: &'static str },
    #[error("unsupported type {qtype} in tensor {tensor:?}")]
    UnsupportedType { tensor: String, qtype: String },
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?}: bytes {start}..{end} lie outside the file (length {file_len})")]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    OverlappingTensors { a: String, b: String },
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },
    #[error("no tensor named {name:?}")]
    NoSuchTensor { name: String },
    #[error("arithmetic overflow computing {what}")]
    Overflow { what: String },

    // --- writer
    #[error("writer: {0}")]
    Write(String),
    #[error("writer I/O error: {0}")]
    WriteIo(#[from] std::io::Error),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
