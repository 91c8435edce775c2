//! ROCmForge engine core: synchronous, no tokio.
//!
//! # Layout
//! - `gguf/`      — GGUF v2/v3 reader over `memmap2` (hardened) and writer.
//! - `quant/`     — `GgmlType`/`QType`, block layouts, dequantization, quantization, CPU dot products.
//! - `tokenizer/` — byte-level BPE and SentencePiece from GGUF metadata; chat templates.
//! - `model/`     — architectures, `HParams`, tensor naming, the one transformer block
//!   (`run_block` over a backend's `BlockOps`, weights as `LayerSet`), CPU forward pass, KV cache.
//! - `backend/`   — `Backend { Cpu, Cuda, Hip }`; CPU always built, CUDA via `cudarc`, HIP behind `hip`.
//! - `kernels`    — device sources embedded from `kernels/` by `build.rs`.
//! - `synth.rs`   — random-weight llama GGUF files (valid random quant blocks) for benches.
//! - `sample.rs`  — samplers (greedy, temperature, top-k/p, min-p, penalties), log-probabilities.
//! - `grammar.rs` — constrained decoding: JSON (schema) and grammar token masks (`llguidance`).
//! - `gbnf.rs`    — llama.cpp's GBNF grammars translated to llguidance's Lark syntax.
//! - `tool_calls.rs` — tool definitions, the tool-call grammar, replies parsed into calls.
//! - `error.rs`   — the crate's error enum, one variant group per concern.

pub mod backend;
pub mod error;
pub mod fuzzing;
pub mod gbnf;
pub mod gguf;
pub mod grammar;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod requantize;
pub mod sample;
pub mod synth;
pub mod tokenizer;
pub mod tool_calls;

pub use error::{Error, Result};
