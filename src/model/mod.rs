//! Llama-family models: tensor naming (`names`), hyper-parameters, forward pass, KV cache.

pub mod names;

pub use names::{arch_key, tensor_name, ArchKey, TensorKind};
