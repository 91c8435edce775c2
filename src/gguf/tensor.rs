//! Tensor descriptors and their grouping by layer.

use super::error::{GgufError, Result};
use super::reader::MAX_TENSOR_ELEMS;
use crate::quant::qtype::GgmlType;
use serde::Serialize;

/// GGUF allows at most 4 dimensions (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;

/// One tensor as the file describes it. `shape[0]` is the contiguous (row) dimension, as in ggml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
    /// Where this tensor's info record starts in the file (for error messages).
    #[serde(skip)]
    pub info_offset: u64,
}

impl TensorInfo {
    /// Validates a shape for a type and computes element and byte counts with checked arithmetic.
    pub fn new(
        name: String,
        shape: Vec<u64>,
        ggml_type: GgmlType,
        offset: u64,
        info_offset: u64,
    ) -> Result<Self> {
        let bad = |reason: &str| GgufError::BadShape {
            tensor: name.clone(),
            shape: shape.clone(),
            reason: reason.to_string(),
        };
        if shape.len() > MAX_DIMS {
            return Err(bad("more than 4 dimensions"));
        }
        let mut n: u64 = 1;
        for &d in &shape {
            n = n
                .checked_mul(d)
                .ok_or_else(|| bad("element count overflows u64"))?;
        }
        if n > MAX_TENSOR_ELEMS {
            return Err(bad("element count over 2^50"));
        }
        let row = shape.first().copied().unwrap_or(1);
        if row % ggml_type.block_elems() != 0 {
            return Err(bad(&format!(
                "row length {row} is not a multiple of the {} block size {}",
                ggml_type,
                ggml_type.block_elems()
            )));
        }
        // n is a multiple of the block size because the row length is.
        let n_bytes = (n / ggml_type.block_elems())
            .checked_mul(ggml_type.block_bytes())
            .ok_or_else(|| bad("byte count overflows u64"))?;
        Ok(Self {
            name,
            shape,
            ggml_type,
            offset,
            n_elements: n,
            n_bytes,
            info_offset,
        })
    }

    /// The layer this tensor belongs to (`blk.N.`), if any.
    pub fn layer(&self) -> Option<usize> {
        layer_of(&self.name)
    }

    /// Rows (product of all dimensions but the first).
    pub fn n_rows(&self) -> u64 {
        self.shape.iter().skip(1).product::<u64>().max(1)
    }

    /// Elements per row (`shape[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// Parses `blk.N.` prefixes.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (num, _) = rest.split_once('.')?;
    if num.is_empty() || num.len() > 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse().ok()
}

/// Tensors of one layer (or of the global group), in file order, with their total extent.
#[derive(Debug, Clone, Serialize)]
pub struct TensorGroup {
    /// `None` for tensors outside any `blk.N.` (embeddings, output norm, head).
    pub layer: Option<usize>,
    /// Indices into `GgufFile::tensors`, sorted by data offset.
    pub tensors: Vec<usize>,
    pub bytes: u64,
    /// Smallest data-relative offset of the group's tensors.
    pub start: u64,
    /// Largest data-relative end of the group's tensors.
    pub end: u64,
}

/// Groups tensors by layer: the global group first (if any), then layers in ascending order.
/// Within a group tensors are in file (offset) order, so a reader can stream layer by layer.
pub fn group_by_layer(tensors: &[TensorInfo]) -> Vec<TensorGroup> {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<Option<usize>, TensorGroup> = BTreeMap::new();
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for i in order {
        let t = &tensors[i];
        let g = groups.entry(t.layer()).or_insert(TensorGroup {
            layer: t.layer(),
            tensors: Vec::new(),
            bytes: 0,
            start: u64::MAX,
            end: 0,
        });
        g.tensors.push(i);
        g.bytes = g.bytes.saturating_add(t.n_bytes);
        g.start = g.start.min(t.offset);
        g.end = g.end.max(t.offset.saturating_add(t.n_bytes));
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("token_embd.weight"), None);
        assert_eq!(layer_of("blk..x"), None);
        assert_eq!(layer_of("blk.99999999999999999999.x"), None);
    }

    #[test]
    fn shape_checks() {
        assert!(TensorInfo::new("a".into(), vec![32, 2], GgmlType::Q4_0, 0, 0).is_ok());
        assert!(TensorInfo::new("a".into(), vec![33, 2], GgmlType::Q4_0, 0, 0).is_err());
        assert!(TensorInfo::new("a".into(), vec![u64::MAX, 2], GgmlType::F32, 0, 0).is_err());
        assert!(TensorInfo::new("a".into(), vec![1 << 30, 1 << 30], GgmlType::F32, 0, 0).is_err());
    }
}
