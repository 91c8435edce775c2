//! ROCmForge pipelined runtime: actors, embedding API, CLI commands.
//!
//! # Layout
//! - `runtime.rs` — the embedding API: `Runtime::builder()`, `RuntimeHandle`, `TokenStream`,
//!   sessions. Every entry point (CLI, server, host services) goes through it: one engine.
//! - `messages.rs` — serde types at the boundary: requests, token events, hints, stats.
//! - `pipeline/` — the five actors (scheduler, reader, transcode, uploader, inference), the
//!   residency board, the staging ring, the load plan and the weight-memory backends.
//! - `compute/` — the seam from the inference actor to a model step (`ModelCompute`): the CPU
//!   llama compute over the core crate, the GPU compute over `backend::gpu`, a checksum stand-in.
//! - `cli/` — the `rocmforge` subcommands; `engine.rs` opens the runtime for `run`, `chat` and
//!   `bench`.
//! - `serve/` — OpenAI-compatible HTTP server, control socket, Prometheus metrics.
//! - `trace/` — Chrome trace recording (a `tracing` layer) and the SVG timeline.
//! - `error.rs` — `RuntimeError`.

pub mod cli;
pub mod compute;
pub mod error;
pub mod messages;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod trace;

pub use error::{Result, RuntimeError};
pub use messages::{
    FinishReason, GenerateRequest, Hint, LoadProgress, MemoryBudget, Prompt, ReadMode,
    SamplingParams, SessionId, Stage, Stats, TokenEvent,
};
pub use runtime::{
    BlockingTokens, Runtime, RuntimeBuilder, RuntimeHandle, StageDelays, TokenStream,
};
