//! ROCmForge pipelined runtime: actors, embedding API, CLI commands.
//!
//! # Layout
//! - `cli/` — subcommands of the `rocmforge` binary (`inspect`, `synth`, `trace`, ...).
//! - `runtime.rs` — the embedding API: `Runtime::builder()`, `RuntimeHandle`, `TokenStream`.
//! - `messages.rs` — serde types at the boundary: requests, token events, hints, stats.
//! - The five actors, in data-flow order:
//!   - `scheduler.rs` — residency: budget, fixed resident set + streaming window, pins, hints.
//!   - `reader.rs` — DiskReader: `mmap` (madvise) or `read`/`O_DIRECT` into staging slots.
//!   - `transcode.rs` — TranscodePool on Rayon: file blocks into the backend's format.
//!   - `uploader.rs` — assembles device memory per layer, publishes `LayerResident`.
//!   - `inference.rs` — queue of requests, KV slots, waits per layer, sampling.
//! - `residency.rs` — the board where resident layers are published and waited for.
//! - `staging.rs` — the fixed ring of staging buffers.
//! - `plan.rs` — the model cut into units (layers + global group) with device offsets.
//! - `backend.rs` — the backend seam (`WeightBackend`) and the CPU host arena.
//! - `gpu.rs` — the GPU `WeightBackend` (pinned slots, copy streams, events), CUDA and HIP alike.
//! - `gpu_compute.rs` — the GPU `ModelCompute` over resident device regions; `open_pipeline`.
//! - `compute.rs` — the compute seam (`ModelCompute`) and the checksum stand-in model.
//! - `llama.rs` — the real compute: the core crate's llama forward pass over resident weights.
//! - `shared.rs` — counters shared by actors and handle.
//! - `trace/` — Chrome trace recording (a `tracing` layer) and the SVG timeline.
//! - `progress.rs` — indicatif progress bars for loading.
//! - `bench.rs` — time-to-first-token split by stage, pipelined vs load-then-compute.
//! - `error.rs` — `RuntimeError`.
//! - `serve/` — OpenAI-compatible HTTP server, control socket, Prometheus metrics.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod compute;
pub mod error;
pub mod gpu;
pub mod gpu_compute;
pub mod inference;
pub mod llama;
pub mod messages;
pub mod plan;
pub mod progress;
pub mod reader;
pub mod residency;
pub mod runtime;
pub mod scheduler;
pub mod serve;
pub mod shared;
pub mod staging;
pub mod trace;
pub mod transcode;
pub mod uploader;

pub use error::{Result, RuntimeError};
pub use messages::{
    FinishReason, GenerateRequest, Hint, LoadProgress, MemoryBudget, Prompt, ReadMode,
    SamplingParams, SessionId, Stage, Stats, TokenEvent,
};
pub use runtime::{
    BlockingTokens, Runtime, RuntimeBuilder, RuntimeHandle, StageDelays, TokenStream,
};
