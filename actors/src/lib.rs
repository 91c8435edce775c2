//! ROCmForge pipelined runtime: actors, embedding API, CLI commands.
//!
//! # Example
//!
//! ```no_run
//! use rocmforge_actors::{GenerateRequest, MemoryBudget, Runtime, SamplingParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Opens the model on the best backend present and starts loading it; half the weights may
//! // stay on the device, the rest streams.
//! let rt = Runtime::builder()
//!     .model("models/SmolLM2-135M-Instruct.Q4_1.gguf")
//!     .memory_budget(MemoryBudget::FractionOfWeights(0.5))
//!     .build()?;
//! let mut req = GenerateRequest::text("The capital of France is", 16);
//! req.sampling = SamplingParams { seed: Some(7), ..SamplingParams::default() };
//! for event in rt.generate(req).into_blocking() {
//!     print!("{}", event?.text);
//! }
//! rt.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `runtime/` — the embedding API: `Runtime::builder()` (`builder.rs`: options and `build`,
//!   which starts the actors), `RuntimeHandle`, `TokenStream`, sessions (`mod.rs`). Every entry point (CLI, server, host services) goes through it: one engine.
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
    FinishReason, GenerateRequest, Hint, LoadProgress, MemoryBudget, ModelHealth, Pooling, Prompt,
    ReadMode, SamplingParams, SessionId, Stage, Stats, TokenEvent, TokenLogprobs,
};
pub use runtime::{
    BlockingTokens, EmbeddingReply, HostLayers, Place, PlacedUnit, Placement, Runtime,
    RuntimeBuilder, RuntimeHandle, StageDelays, TokenStream, Tuning,
};
