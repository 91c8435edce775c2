//! The load plan: the model cut into schedulable units (one per layer, plus the global group)
//! with each tensor's file range and its place in the unit's device memory.
//!
//! When the budget cannot hold the output head (the `[vocab, d]` output matrix, which is also the
//! token embedding table in tied models: 31 % of SmolLM2), `stream_head` moves it out of the
//! global unit into row chunks of about a layer's size, appended after the global unit, so the
//! head streams through the window like the layers. Each chunk is one `TensorSlot` naming the
//! head tensor with its row range (`rows`); the rows of one chunk are contiguous in the file.
//!
//! When the budget cannot hold a mixture-of-experts model, `split_experts` moves each MoE
//! layer's experts out of the layer's unit into units of their own, one per expert (its rows of
//! the three stacked tensors `ffn_{gate,up,down}_exps`, three slots with row ranges), appended
//! after the other units: the layer's unit keeps attention, norms, router and shared expert,
//! and compute asks only for the experts its tokens were routed to.

use crate::error::{Result, RuntimeError};
use crate::pipeline::backend::WeightBackend;
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
    /// The rows of the tensor this slot holds (a chunk of the streamed head); `None`: all rows.
    pub rows: Option<Range<u64>>,
}

/// `(cols, rows)` of every tensor of every unit, computed once at build.
pub type UnitDims = std::sync::Arc<Vec<std::sync::Arc<Vec<(u64, u64)>>>>;

#[derive(Debug, Clone)]
pub struct Unit {
    /// `Some(n)` for `blk.n.*`, `None` for the global group (embeddings, output norm, head).
    pub layer: Option<usize>,
    /// `Some(e)` for a unit holding expert `e` of its layer (`split_experts`).
    pub expert: Option<usize>,
    pub tensors: Vec<TensorSlot>,
    pub file_bytes: u64,
    /// Device bytes including alignment padding: what the budget is charged.
    pub dev_bytes: u64,
    /// Smallest range covering all tensors in the file.
    pub file_span: Range<u64>,
}

/// The output head streamed in row chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSplit {
    /// The head tensor: `output.weight`, or `token_embd.weight` when the model ties them.
    pub tensor: String,
    /// Rows of the whole head (the vocabulary size).
    pub rows: u64,
    /// The chunk units, in row order.
    pub units: Range<usize>,
}

/// The experts of one MoE layer in units of their own: unit `units.start + e` is expert `e`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSplit {
    pub layer: usize,
    pub units: Range<usize>,
}

/// Units `0..n_layers` are the layers; unit `n_layers` is the global group; with a streamed head,
/// units `n_layers + 1..` are its row chunks; with split experts, the expert units follow.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub units: Vec<Unit>,
    pub n_layers: usize,
    pub head: Option<HeadSplit>,
    /// The MoE layers whose experts are units of their own, in layer order.
    pub experts: Vec<ExpertSplit>,
    /// Layers a GPU compute runs on the host (`place_on_host`): their units hold nothing.
    pub host_layers: Range<usize>,
}

/// Head chunks hold a multiple of this many rows, so a chunked matrix-vector product groups rows
/// the same way as the whole one (row-parallel kernels split work in row blocks).
pub const HEAD_ROW_ALIGN: u64 = 256;

/// Lays tensors out one after another in a unit's device memory, each aligned.
fn layout_unit(tensors: &mut [TensorSlot]) -> u64 {
    let mut dev = 0u64;
    for t in tensors {
        dev = dev.div_ceil(DEVICE_ALIGN) * DEVICE_ALIGN;
        t.dev_offset = dev;
        dev += t.dev_len;
    }
    dev
}

fn file_span(tensors: &[TensorSlot]) -> Range<u64> {
    let lo = tensors.iter().map(|t| t.file.start).min();
    let hi = tensors.iter().map(|t| t.file.end).max();
    match (lo, hi) {
        (Some(lo), Some(hi)) => lo..hi,
        _ => 0..0,
    }
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
                    rows: None,
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
                expert: None,
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
                    expert: None,
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
        Ok(Self {
            units,
            n_layers,
            head: None,
            experts: Vec::new(),
            host_layers: 0..0,
        })
    }

    /// Moves the output head out of the global unit into row chunks of at most
    /// `max_chunk_bytes` device bytes (rounded to `HEAD_ROW_ALIGN` rows, at least that many).
    /// `None` when the global unit has no head tensor or the head is already split.
    pub fn stream_head(
        &self,
        file: &GgufFile,
        backend: &dyn WeightBackend,
        max_chunk_bytes: u64,
    ) -> Result<Option<Self>> {
        use rocmforge::model::{tensor_name, TensorKind};
        if self.head.is_some() {
            return Ok(None);
        }
        let g = self.global();
        let mut global = self.units[g].clone();
        let find = |kind| {
            let name = tensor_name(kind, None);
            global.tensors.iter().position(|t| t.name == name)
        };
        let Some(pos) = find(TensorKind::Output).or_else(|| find(TensorKind::TokenEmbd)) else {
            return Ok(None);
        };
        let head = global.tensors.remove(pos);
        let info = &file.tensors()[head.index];
        let (cols, rows) = (info.row_len(), info.n_rows());
        let row_bytes = head.ty.row_bytes(cols).ok_or_else(|| {
            RuntimeError::Config(format!(
                "{}: {cols} columns are not whole {} blocks",
                head.name,
                head.ty.name()
            ))
        })?;
        let dev_row = backend.transcoded_bytes(head.ty, row_bytes).max(1);
        let per_chunk = (max_chunk_bytes / dev_row / HEAD_ROW_ALIGN).max(1) * HEAD_ROW_ALIGN;
        global.file_bytes -= head.file.end - head.file.start;
        global.dev_bytes = layout_unit(&mut global.tensors);
        global.file_span = file_span(&global.tensors);
        let mut units = self.units.clone();
        units[g] = global;
        let first = units.len();
        let mut r0 = 0u64;
        while r0 < rows {
            let r1 = (r0 + per_chunk).min(rows);
            let file_range = head.file.start + r0 * row_bytes..head.file.start + r1 * row_bytes;
            let file_len = file_range.end - file_range.start;
            let slot = TensorSlot {
                index: head.index,
                name: head.name.clone(),
                ty: head.ty,
                file: file_range.clone(),
                dev_offset: 0,
                dev_len: backend.transcoded_bytes(head.ty, file_len),
                rows: Some(r0..r1),
            };
            units.push(Unit {
                layer: None,
                expert: None,
                file_bytes: file_len,
                dev_bytes: slot.dev_len,
                file_span: file_range,
                tensors: vec![slot],
            });
            r0 = r1;
        }
        Ok(Some(Self {
            head: Some(HeadSplit {
                tensor: head.name.clone(),
                rows,
                units: first..units.len(),
            }),
            units,
            n_layers: self.n_layers,
            experts: self.experts.clone(),
            host_layers: self.host_layers.clone(),
        }))
    }

    /// Moves each MoE layer's experts into units of their own (see the module docs); `None`
    /// when no layer has stacked experts it can run apart (a router, all three stacked tensors
    /// of one expert count, no norm after the FFN), or they are split already. A streamed head
    /// keeps its units: the expert units come after them.
    pub fn split_experts(
        &self,
        file: &GgufFile,
        backend: &dyn WeightBackend,
    ) -> Result<Option<Self>> {
        use rocmforge::model::{tensor_name, TensorKind};
        if !self.experts.is_empty() {
            return Ok(None);
        }
        let mut units = self.units.clone();
        let mut experts = Vec::new();
        for l in 0..self.n_layers {
            let unit = &units[l];
            let find = |kind| {
                let name = tensor_name(kind, Some(l));
                unit.tensors.iter().position(|t| t.name == name)
            };
            let stacked = [
                TensorKind::FfnGateExps,
                TensorKind::FfnUpExps,
                TensorKind::FfnDownExps,
            ]
            .map(find);
            let [Some(g), Some(u), Some(d)] = stacked else {
                continue;
            };
            if find(TensorKind::FfnGateInp).is_none() || find(TensorKind::FfnPostNorm).is_some() {
                continue;
            }
            // (slot, row bytes, rows per expert) of gate, up, down.
            let mut parts = Vec::with_capacity(3);
            let mut n_expert = None;
            for i in [g, u, d] {
                let slot = &unit.tensors[i];
                let info = &file.tensors()[slot.index];
                let (cols, n) = match info.shape.as_slice() {
                    [cols, rows, n] => ((*cols, *rows), *n),
                    other => {
                        return Err(RuntimeError::Config(format!(
                            "{}: stacked experts of shape {other:?}, expected 3 dimensions",
                            slot.name
                        )))
                    }
                };
                if n == 0 || n_expert.is_some_and(|m| m != n) {
                    return Err(RuntimeError::Config(format!(
                        "{}: {n} experts where the layer's other stacked tensors have {n_expert:?}",
                        slot.name
                    )));
                }
                n_expert = Some(n);
                let row_bytes = slot.ty.row_bytes(cols.0).ok_or_else(|| {
                    RuntimeError::Config(format!(
                        "{}: {} columns are not whole {} blocks",
                        slot.name,
                        cols.0,
                        slot.ty.name()
                    ))
                })?;
                parts.push((slot.clone(), row_bytes, cols.1));
            }
            let n_expert = n_expert.unwrap_or(0);
            let first = units.len();
            for e in 0..n_expert {
                let mut tensors: Vec<TensorSlot> = parts
                    .iter()
                    .map(|(slot, row_bytes, rows)| {
                        let start = slot.file.start + e * rows * row_bytes;
                        let len = rows * row_bytes;
                        TensorSlot {
                            index: slot.index,
                            name: slot.name.clone(),
                            ty: slot.ty,
                            file: start..start + len,
                            dev_offset: 0,
                            dev_len: backend.transcoded_bytes(slot.ty, len),
                            rows: Some(e * rows..(e + 1) * rows),
                        }
                    })
                    .collect();
                let dev_bytes = layout_unit(&mut tensors);
                units.push(Unit {
                    layer: Some(l),
                    expert: Some(e as usize),
                    file_bytes: tensors.iter().map(|t| t.file.end - t.file.start).sum(),
                    dev_bytes,
                    file_span: file_span(&tensors),
                    tensors,
                });
            }
            let layer = &mut units[l];
            let mut moved = [g, u, d];
            moved.sort_unstable();
            for &i in moved.iter().rev() {
                let t = layer.tensors.remove(i);
                layer.file_bytes -= t.file.end - t.file.start;
            }
            layer.dev_bytes = layout_unit(&mut layer.tensors);
            layer.file_span = file_span(&layer.tensors);
            experts.push(ExpertSplit {
                layer: l,
                units: first..units.len(),
            });
        }
        if experts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            units,
            n_layers: self.n_layers,
            head: self.head.clone(),
            experts,
            host_layers: self.host_layers.clone(),
        }))
    }

    /// The plan with `layers` computed on the host from the mapped file (a GPU compute's host
    /// layers): their units keep no tensors, so they take no device memory and load nothing.
    pub fn place_on_host(&self, layers: Range<usize>) -> Self {
        let mut plan = self.clone();
        plan.host_layers = layers.start.min(self.n_layers)..layers.end.min(self.n_layers);
        for l in plan.host_layers.clone() {
            let u = &mut plan.units[l];
            u.tensors.clear();
            u.file_bytes = 0;
            u.dev_bytes = 0;
            u.file_span = 0..0;
        }
        plan
    }

    /// The units of layer `layer`'s experts, when they are units of their own.
    pub fn experts_of(&self, layer: usize) -> Option<Range<usize>> {
        self.experts
            .iter()
            .find(|s| s.layer == layer)
            .map(|s| s.units.clone())
    }

    /// The order compute uses the units in, once per token: each layer followed by its
    /// experts' units, the global unit, the head's chunks.
    pub fn use_order(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.units.len());
        for l in 0..self.n_layers {
            order.push(l);
            order.extend(self.experts_of(l).unwrap_or(0..0));
        }
        order.push(self.global());
        if let Some(h) = &self.head {
            order.extend(h.units.clone());
        }
        order
    }

    /// `(cols, rows)` of every tensor slot of every unit (a head chunk's rows are its own).
    pub fn unit_dims(&self, file: &GgufFile) -> UnitDims {
        std::sync::Arc::new(
            self.units
                .iter()
                .map(|u| {
                    std::sync::Arc::new(
                        u.tensors
                            .iter()
                            .map(|t| {
                                let ti = &file.tensors()[t.index];
                                let rows = match &t.rows {
                                    Some(r) => r.end - r.start,
                                    None => ti.n_rows(),
                                };
                                (ti.row_len(), rows)
                            })
                            .collect(),
                    )
                })
                .collect(),
        )
    }

    /// The head rows a chunk unit holds (`None` for layers, experts and the global unit).
    pub fn head_rows(&self, unit: usize) -> Option<Range<u64>> {
        let u = self.units.get(unit)?;
        if u.expert.is_some() {
            return None;
        }
        u.tensors.first()?.rows.clone()
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
        } else if let Some(Unit {
            layer: Some(l),
            expert: Some(e),
            ..
        }) = self.units.get(unit)
        {
            format!("layer {l} expert {e}")
        } else if let Some(r) = self.head_rows(unit) {
            format!("head rows {}..{}", r.start, r.end)
        } else {
            format!("layer {unit}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::backend::CpuBackend;

    fn tiny(family: &str) -> GgufFile {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/tiny-families")
            .join(format!("{family}.q8_0.gguf"));
        GgufFile::open(path).expect("tiny model")
    }

    #[test]
    fn split_experts_cuts_each_stacked_tensor_into_one_row_block_per_expert() {
        let file = tiny("qwen3moe");
        let backend = CpuBackend::new();
        let plan = LoadPlan::new(&file, &backend).unwrap();
        let split = plan
            .split_experts(&file, &backend)
            .unwrap()
            .expect("a MoE model");
        assert!(
            split.split_experts(&file, &backend).unwrap().is_none(),
            "split twice"
        );
        assert_eq!(split.experts.len(), plan.n_layers);
        // Nothing lost or read twice: the same file bytes in all.
        let bytes = |p: &LoadPlan| p.units.iter().map(|u| u.file_bytes).sum::<u64>();
        assert_eq!(bytes(&split), bytes(&plan));
        for s in &split.experts {
            let layer = &split.units[s.layer];
            assert!(layer.tensors.iter().all(|t| !t.name.contains("_exps")));
            assert!(layer
                .tensors
                .iter()
                .any(|t| t.name.contains("ffn_gate_inp")));
            // Per stacked tensor: the experts' ranges tile it in expert order.
            for name in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
                let whole = plan.units[s.layer]
                    .tensors
                    .iter()
                    .find(|t| t.name.contains(name))
                    .expect("stacked tensor");
                let mut at = whole.file.start;
                for (e, u) in s.units.clone().enumerate() {
                    let unit = &split.units[u];
                    assert_eq!((unit.layer, unit.expert), (Some(s.layer), Some(e)));
                    let t = unit.tensors.iter().find(|t| t.name.contains(name)).unwrap();
                    assert_eq!(t.file.start, at, "{name} expert {e}");
                    let rows = t.rows.clone().expect("a row block");
                    assert_eq!(
                        rows.end - rows.start,
                        (t.file.end - t.file.start)
                            / t.ty.row_bytes(file.tensors()[t.index].row_len()).unwrap()
                    );
                    at = t.file.end;
                }
                assert_eq!(at, whole.file.end, "{name}: the experts cover it");
            }
        }
        // The use order visits every unit once, each layer's experts right after it.
        let order = split.use_order();
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..split.units.len()).collect::<Vec<_>>());
        let s0 = &split.experts[0];
        assert_eq!(
            order[1..1 + s0.units.len()],
            s0.units.clone().collect::<Vec<_>>()
        );
        assert_eq!(split.unit_name(s0.units.start + 1), "layer 0 expert 1");
        assert_eq!(split.head_rows(s0.units.start), None);
    }

    #[test]
    fn a_dense_model_has_no_experts_to_split_and_host_layers_hold_nothing() {
        let file = tiny("llama");
        let backend = CpuBackend::new();
        let plan = LoadPlan::new(&file, &backend).unwrap();
        assert!(plan.split_experts(&file, &backend).unwrap().is_none());
        let n = plan.n_layers;
        let host = plan.place_on_host(n - 1..n);
        assert_eq!(host.units[n - 1].dev_bytes, 0);
        assert!(host.units[n - 1].tensors.is_empty());
        assert_eq!(
            host.total_dev_bytes(),
            plan.total_dev_bytes() - plan.units[n - 1].dev_bytes
        );
        assert_eq!(host.units[0].dev_bytes, plan.units[0].dev_bytes);
    }
}
