//! The five actors and what they share, in data-flow order. Each actor is a thread that owns its
//! state and waits on its channel (or a notify) together with the runtime's cancellation token.
//!
//! - `scheduler.rs` — residency: budget, fixed resident set + streaming window, pins, hints.
//! - `reader.rs` — DiskReader: `mmap` (madvise) or `pread`/`O_DIRECT` into staging slots.
//! - `transcode.rs` — TranscodePool on Rayon: file blocks into the backend's format.
//! - `uploader.rs` — assembles device memory per unit, publishes it on the residency board.
//! - `inference.rs` — continuous batching: the running set, admission, sessions, sampling;
//!   `inference/step.rs` runs one batched step over the units; `inference/sessions.rs` holds
//!   the KV slots and the chat sessions kept between turns.
//! - `batch.rs` — batching limits and which tokens a step carries (decode first, prompt chunks).
//! - `sampling.rs` — a request's sampler and the UTF-8 assembly of its text.
//! - `residency.rs` — the board where resident units are published and waited for.
//! - `staging.rs` — the fixed ring of staging buffers.
//! - `plan.rs` — the model cut into units (layers + global group) with device offsets.
//! - `backend.rs` — the weight-memory seam (`WeightBackend`) and the CPU host arena.
//! - `gpu.rs` — the GPU `WeightBackend` (pinned slots, copy streams, events, region pool).
//! - `source.rs` — the model file's accepted identity; checked descriptors that follow reloads.
//! - `shared.rs` — counters shared by actors and handle; the cancellable blocking waits.

pub mod backend;
pub mod batch;
pub mod gpu;
pub mod inference;
pub mod plan;
pub mod reader;
pub mod residency;
pub mod sampling;
pub mod scheduler;
pub mod shared;
pub mod source;
pub mod staging;
pub mod transcode;
pub mod uploader;
