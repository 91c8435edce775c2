//! Llama-family models (llama, mistral, qwen2, qwen3, gemma3, phi3, qwen3moe, qwen2moe):
//! tensor naming (`names`), hyper-parameters, the one block, forward pass, KV cache.
//!
//! - `hparams`: `Arch`, `HParams` (`TryFrom<&Metadata>`), RoPE settings.
//! - `block`: one transformer block written once: a layer's weights by role (`LayerSet<T>`,
//!   whatever holds them) and the block's steps (`run_block`) over a backend's `BlockOps`.
//! - `weights`: where each tensor lives (`TensorRef`, `ModelLayout`) and views (`WeightView`,
//!   `LayerWeights = LayerSet<WeightView>`) over the mmap or a runtime's host arena.
//! - `kv`: the KV cache of a sequence (a block table) and `Sequence` (cache + position +
//!   scratch).
//! - `paged`: the pool of fixed-size KV blocks sequences share, and its block allocator.
//! - `forward`: `Model` with `embed`, `forward_layer`, `output`, `forward`; the CPU's
//!   `BlockOps`.
//! - `generate`: the prefill + decode loop with sampling.
//! - `moe`: the mixture-of-experts FFN (router top-k, experts on their routed tokens).
//! - `attention`: the CPU attention of a step's sequences over their paged caches (one
//!   parallel loop over every sequence's heads).
//! - `ops`, `rope`: the CPU ops.

mod attention;
pub mod block;
pub mod error;
pub mod forward;
pub mod generate;
pub mod hparams;
pub mod kv;
pub mod moe;
pub mod names;
pub mod ops;
pub mod paged;
pub mod rope;
pub mod weights;

pub use block::{experts_separable, run_block, run_block_routed, Act, BlockOps, LayerSet, Role};
pub use error::ModelError;
pub use forward::Model;
pub use generate::{Generation, StopReason, Timings};
pub use hparams::{Arch, FfnActivation, HParams, LocalAttention, Moe, RopeLayout, RopeScaling};
pub use kv::{
    bytes_per_token, ContextFit, KvCache, KvLimit, KvType, Scratch, Sequence, SequenceConfig,
    DEFAULT_CTX, MIN_CTX,
};
pub use names::{arch_key, tensor_name, ArchKey, TensorKind};
pub use ops::Precision;
pub use paged::{
    lock as lock_kv_pool, BlockAllocator, BlockId, KvPool, KvPoolStats, SharedKvPool,
    DEFAULT_BLOCK_TOKENS,
};
pub use weights::{LayerRefs, LayerWeights, ModelLayout, TensorRef, WeightView};
