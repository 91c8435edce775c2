//! GGUF v2/v3: a hardened reader over `memmap2` and a writer.
//!
//! - `reader`: the parser (`parse(&[u8])`), caps on every count, checked arithmetic.
//! - `file`: `GgufFile`, the parsed file over a memory map with zero-copy tensor views.
//! - `metadata` / `value`: typed key/value metadata.
//! - `tensor`: `TensorInfo` and grouping by layer (`blk.N.`).
//! - `writer`: writes metadata and raw tensor blocks with correct alignment.

pub mod error;
pub mod file;
pub mod metadata;
pub mod reader;
pub mod tensor;
pub mod value;
pub mod writer;

pub use error::GgufError;
pub use file::GgufFile;
pub use metadata::Metadata;
pub use reader::{parse, GgufLayout};
pub use tensor::{group_by_layer, layer_of, TensorGroup, TensorInfo};
pub use value::{Array, ArrayItems, Value, ValueType};
pub use writer::{write_to_vec, GgufWriter, TensorSpec};
