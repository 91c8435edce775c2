//! Quantization formats: type ids and block geometry (`qtype`), and per family the block
//! layouts, scalar reference dequantizers, fast paths and CPU dot products.

pub mod qtype;

pub use qtype::{GgmlType, TypeId};
