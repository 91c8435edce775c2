//! The load plan: the model cut into schedulable units (one per layer, plus the global group)
//! with each tensor's file range and its place in the unit's device memory.

use crate::backend::WeightBackend;
use crate::error::{Result, RuntimeError};
use rocmforge::gguf::GgufFile;
use rocmforge::quant::qtype::GgmlType;
use std::ops::Range;

/// Device offsets are aligned so every tensor starts on a cache line / vector boundary.
pub const DEVICE_ALIGN: u64 = 64;

#[derive(Debug, Clone)]
pub struct TensorSlot {
    /// Index into `GgufFile::tensors`.
    pub index: usize,
    pub name: String,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub file: Range<u64>,
    /// Offset and length in the unit's device memory.
    pub dev_offset: u64,
    pub dev_len: u64,
}

/// `(cols, rows)` of every tensor of every unit, computed once at build.
pub type UnitDims = std::sync::Arc<Vec<std::sync::Arc<Vec<(u64, u64)>>>>;

#[derive(Debug, Clone)]
pub struct Unit {
    /// `Some(n)` for `blk.n.*`, `None` for the global group (embeddings, output norm, head).
    pub layer: Option<usize>,
    pub tensors: Vec<TensorSlot>,
    pub file_bytes: u64,
    /// Device bytes including alignment padding: what the budget is charged.
    pub dev_bytes: u64,
    /// Smallest range covering all tensors in the file.
    pub file_span: Range<u64>,
}

/// Units `0..n_layers` are the layers; unit `n_layers` is the global group.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub units: Vec<Unit>,
    pub n_layers: usize,
}

impl LoadPlan {
    pub fn new(file: &GgufFile, backend: &dyn WeightBackend) -> Result<Self> {
        let groups = file.layer_groups();
        let n_layers = groups
            .iter()
            .filter_map(|g| g.layer)
            .max()
            .map(|m| m + 1)
            .ok_or_else(|| RuntimeError::NoLayers {
                path: file.path().to_path_buf(),
            })?;
        let mut units: Vec<Option<Unit>> = vec![None; n_layers + 1];
        for g in &groups {
            let mut tensors = Vec::with_capacity(g.tensors.len());
            let mut dev = 0u64;
            let mut file_bytes = 0u64;
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            for &i in &g.tensors {
                let t = &file.tensors()[i];
                let r = file.tensor_range(t);
                let dev_len = backend.transcoded_bytes(t.ggml_type, t.n_bytes);
                dev = dev.div_ceil(DEVICE_ALIGN) * DEVICE_ALIGN;
                tensors.push(TensorSlot {
                    index: i,
                    name: t.name.clone(),
                    ty: t.ggml_type,
                    file: r.start as u64..r.end as u64,
                    dev_offset: dev,
                    dev_len,
                });
                dev += dev_len;
                file_bytes += t.n_bytes;
                lo = lo.min(r.start as u64);
                hi = hi.max(r.end as u64);
            }
            let slot = match g.layer {
                Some(l) => l,
                None => n_layers,
            };
            units[slot] = Some(Unit {
                layer: g.layer,
                tensors,
                file_bytes,
                dev_bytes: dev,
                file_span: if lo > hi { 0..0 } else { lo..hi },
            });
        }
        let units = units
            .into_iter()
            .enumerate()
            .map(|(i, u)| match u {
                Some(u) => Ok(u),
                None if i == n_layers => Ok(Unit {
                    layer: None,
                    tensors: Vec::new(),
                    file_bytes: 0,
                    dev_bytes: 0,
                    file_span: 0..0,
                }),
                None => Err(RuntimeError::Config(format!(
                    "model has layers up to {} but no tensors for layer {i}",
                    n_layers - 1
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { units, n_layers })
    }

    pub fn global(&self) -> usize {
        self.n_layers
    }

    pub fn total_dev_bytes(&self) -> u64 {
        self.units.iter().map(|u| u.dev_bytes).sum()
    }

    pub fn unit_name(&self, unit: usize) -> String {
        if unit == self.n_layers {
            "global".to_string()
        } else {
            format!("layer {unit}")
        }
    }
}
