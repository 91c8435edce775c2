//! The five actors and what they share, in data-flow order. Each actor is a thread that owns its
//! state and waits on its channel (or a notify) together with the runtime's cancellation token.
//!
//! - `scheduler.rs` — residency: budget, fixed resident set + streaming window, pins, hints.
//! - `reader.rs` — DiskReader: `mmap` (madvise) or `pread`/`O_DIRECT` into staging slots.
//! - `transcode.rs` — TranscodePool on Rayon: file blocks into the backend's format.
//! - `uploader.rs` — assembles device memory per unit, publishes it on the residency board.
//! - `inference.rs` — the request queue, KV slots and sessions, waits per layer, sampling.
//! - `residency.rs` — the board where resident units are published and waited for.
//! - `staging.rs` — the fixed ring of staging buffers.
//! - `plan.rs` — the model cut into units (layers + global group) with device offsets.
//! - `backend.rs` — the weight-memory seam (`WeightBackend`) and the CPU host arena.
//! - `gpu.rs` — the GPU `WeightBackend` (pinned slots, copy streams, events, region pool).
//! - `source.rs` — the model file's accepted identity; checked descriptors that follow reloads.
//! - `shared.rs` — counters shared by actors and handle; the cancellable blocking waits.

pub mod backend;
pub mod gpu;
pub mod inference;
pub mod plan;
pub mod reader;
pub mod residency;
pub mod scheduler;
pub mod shared;
pub mod source;
pub mod staging;
pub mod transcode;
pub mod uploader;
