//! Where each weight lives (`TensorRef`), checked against the hyper-parameters at load, and
//! borrowed views of the bytes (`WeightView`) that the forward pass computes with.
//!
//! Views borrow from the mmap by default (zero copy); the pipelined runtime builds the same
//! `LayerWeights` over its own host arena from the `TensorRef`s' types and shapes.

use super::block::LayerSet;
use super::error::ModelError;
use super::hparams::HParams;
use super::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::GgmlType;
use std::collections::HashSet;
use std::ops::Range;

/// A matrix (or vector, `rows == 1`) in GGUF row-major order: `rows` rows of `cols` elements,
/// each row `ty.row_bytes(cols)` bytes.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        // Checked at construction (`TensorRef::view`) and in `TensorInfo::new`.
        self.ty.row_bytes(self.cols as u64).unwrap_or(0) as usize
    }

    /// The bytes of row `r` (`r < rows`).
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The matrix of rows `first .. first + n` (one expert of a stacked 3-D tensor). Rows are
    /// whole quant blocks, so a row range is itself a valid matrix of the same type. Out of
    /// range gives an empty view, which the kernels refuse by length with the tensor's name.
    pub fn rows(&self, first: usize, n: usize) -> WeightView<'a> {
        let rb = self.row_bytes();
        let data = first
            .checked_mul(rb)
            .zip(n.checked_mul(rb))
            .and_then(|(a, len)| self.data.get(a..a.checked_add(len)?))
            .unwrap_or(&[]);
        WeightView {
            ty: self.ty,
            rows: n,
            cols: self.cols,
            data,
        }
    }
}

/// One tensor's location and geometry in the file, or a block of its rows (Phi-3's fused
/// `attn_qkv` holds Q, K and V; its `ffn_up` holds gate and up).
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// The file tensor these bytes belong to.
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Absolute byte range in the file of these rows.
    pub range: Range<usize>,
    /// Where these rows start inside the tensor `name`, in bytes (0 for a whole tensor).
    pub offset: usize,
}

impl TensorRef {
    /// A view into the whole mapped file.
    pub fn view<'a>(&self, file: &'a [u8]) -> WeightView<'a> {
        self.view_with(file.get(self.range.clone()).unwrap_or(&[]))
    }

    /// A view over `data`, a buffer holding exactly the tensor `name` (a runtime's host
    /// arena); a row block takes its part of it. A buffer too short gives a short view, which
    /// the kernels refuse by length with the tensor's name.
    pub fn view_of<'a>(&self, data: &'a [u8]) -> WeightView<'a> {
        let end = self.offset.saturating_add(self.range.len());
        self.view_with(data.get(self.offset..end).unwrap_or(&[]))
    }

    fn view_with<'a>(&self, data: &'a [u8]) -> WeightView<'a> {
        WeightView {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }

    /// Rows `first .. first + n` of this tensor as a reference of their own.
    fn row_block(&self, first: usize, n: usize) -> TensorRef {
        let rb = self.ty.row_bytes(self.cols as u64).unwrap_or(0) as usize;
        let start = self.range.start + first * rb;
        TensorRef {
            name: self.name.clone(),
            ty: self.ty,
            rows: n,
            cols: self.cols,
            range: start..start + n * rb,
            offset: self.offset + first * rb,
        }
    }
}

/// The weights of one transformer block as views of their bytes.
pub type LayerWeights<'a> = LayerSet<WeightView<'a>>;

/// Tensor locations of one block.
pub type LayerRefs = LayerSet<TensorRef>;

impl LayerSet<TensorRef> {
    /// Views over the whole mapped file.
    pub fn views<'a>(&self, file: &'a [u8]) -> LayerWeights<'a> {
        self.map(|_, t| t.view(file))
    }

    /// All tensors of the block, for runtimes that copy a layer elsewhere (a fused tensor's
    /// row blocks appear once each, under the one name).
    pub fn all(&self) -> Vec<&TensorRef> {
        self.iter().map(|(_, t)| t).collect()
    }
}

/// LongRoPE's two sets of frequency divisors (`[n_rot / 2]` each): `long` for sequences whose
/// context passes `orig_ctx`, `short` within it (llama.cpp decides by the context the same way).
#[derive(Debug, Clone)]
pub struct LongRopeRefs {
    pub long: TensorRef,
    pub short: TensorRef,
    pub orig_ctx: usize,
}

/// Every tensor the forward pass uses, located and shape-checked.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub token_embd: TensorRef,
    pub output_norm: TensorRef,
    /// `None` when the head is tied to `token_embd`.
    pub output: Option<TensorRef>,
    /// Llama 3.1 frequency divisors, `[n_rot / 2]`.
    pub rope_freqs: Option<TensorRef>,
    /// LongRoPE frequency divisors (Phi-3 128k, Phi-3.5).
    pub long_rope: Option<LongRopeRefs>,
    pub layers: Vec<LayerRefs>,
    pub n_vocab: usize,
}

/// Checks that the tokenizer, `<arch>.vocab_size` and the output head agree with the
/// embedding table's `embd_rows`, so every id the tokenizer emits has a row and every row the
/// head scores is a vocabulary entry or padding. More embedding rows than tokens is padding
/// (converters round the table up, llama.cpp accepts it); fewer would make ordinary text fail
/// at the embedding lookup.
pub fn check_vocab(file: &GgufFile, hp: &HParams, embd_rows: usize) -> Result<(), ModelError> {
    let md = file.metadata();
    let mismatch = |of: String, found: usize, rule| ModelError::VocabMismatch {
        of,
        found,
        embd_rows,
        rule,
    };
    let vocab_key = arch_key(hp.arch.name(), ArchKey::VocabSize);
    if let Some(v) = md.get_u64(&vocab_key)? {
        if v != embd_rows as u64 {
            return Err(mismatch(
                vocab_key,
                usize::try_from(v).unwrap_or(usize::MAX),
                "the declared vocabulary size must be the embedding table's row count",
            ));
        }
    }
    if let Some(tokens) = md.get_array(keys::TOK_TOKENS)? {
        let n = tokens.items.len();
        if n > embd_rows {
            return Err(mismatch(
                format!("the token count of {}", keys::TOK_TOKENS),
                n,
                "every token needs an embedding row; only extra rows (padding) are allowed",
            ));
        }
    }
    if let Some(t) = file.tensor(&tensor_name(TensorKind::Output, None)) {
        // A 1-row head is `[d]`, trimmed like any vector; its row count is the second dim.
        let rows = t.shape.get(1).copied().unwrap_or(1);
        if rows != embd_rows as u64 {
            return Err(mismatch(
                format!("the row count of {}", t.name),
                usize::try_from(rows).unwrap_or(usize::MAX),
                "the output head scores exactly the embedded vocabulary",
            ));
        }
    }
    Ok(())
}

/// Trailing 1s do not change a tensor's meaning (`[576, 1]` is `[576]`).
fn trim(shape: &[u64]) -> &[u64] {
    let mut n = shape.len();
    while n > 1 && shape[n - 1] == 1 {
        n -= 1;
    }
    &shape[..n]
}

struct Locator<'f> {
    file: &'f GgufFile,
    used: HashSet<String>,
}

impl Locator<'_> {
    fn info(&mut self, name: &str) -> Option<&TensorInfo> {
        let t = self.file.tensor(name)?;
        self.used.insert(name.to_string());
        Some(t)
    }

    /// `expected` in GGUF order: `[cols]` for vectors, `[cols, rows]` for matrices.
    fn opt(
        &mut self,
        kind: TensorKind,
        layer: Option<usize>,
        expected: &[u64],
    ) -> Result<Option<TensorRef>, ModelError> {
        let name = tensor_name(kind, layer);
        let file = self.file;
        let Some(t) = self.info(&name) else {
            return Ok(None);
        };
        if trim(&t.shape) != trim(expected) {
            return Err(ModelError::TensorShape {
                name,
                expected: expected.to_vec(),
                found: t.shape.clone(),
            });
        }
        if !t.ggml_type.is_supported() {
            return Err(ModelError::UnsupportedTensorType {
                name,
                ty: t.ggml_type,
            });
        }
        // Vectors (norms, biases) are read element-wise as f32 by the forward pass.
        if expected.len() == 1 && t.ggml_type != GgmlType::F32 && t.ggml_type != GgmlType::F16 {
            return Err(ModelError::UnsupportedTensorType {
                name,
                ty: t.ggml_type,
            });
        }
        Ok(Some(TensorRef {
            name,
            ty: t.ggml_type,
            cols: t.row_len() as usize,
            rows: t.n_rows() as usize,
            range: file.tensor_range(t),
            offset: 0,
        }))
    }

    fn req(
        &mut self,
        kind: TensorKind,
        layer: Option<usize>,
        expected: &[u64],
    ) -> Result<TensorRef, ModelError> {
        self.opt(kind, layer, expected)?
            .ok_or_else(|| ModelError::MissingTensor {
                name: tensor_name(kind, layer),
            })
    }
}

impl ModelLayout {
    /// Locates every tensor, checks shapes and types against `hp`, and rejects files holding
    /// tensors the forward pass would silently ignore.
    pub fn from_file(file: &GgufFile, hp: &HParams) -> Result<Self, ModelError> {
        let mut loc = Locator {
            file,
            used: HashSet::new(),
        };
        let d = hp.n_embd as u64;
        let embd_name = tensor_name(TensorKind::TokenEmbd, None);
        let n_vocab = match file.tensor(&embd_name) {
            Some(t) if t.shape.len() == 2 => t.shape[1] as usize,
            Some(t) => {
                return Err(ModelError::TensorShape {
                    name: embd_name,
                    expected: vec![d, hp.n_vocab.unwrap_or(0) as u64],
                    found: t.shape.clone(),
                })
            }
            None => return Err(ModelError::MissingTensor { name: embd_name }),
        };
        check_vocab(file, hp, n_vocab)?;
        let nv = n_vocab as u64;
        let token_embd = loc.req(TensorKind::TokenEmbd, None, &[d, nv])?;
        let output_norm = loc.req(TensorKind::OutputNorm, None, &[d])?;
        let output = loc.opt(TensorKind::Output, None, &[d, nv])?;
        let half_rot = hp.n_rot as u64 / 2;
        let rope_freqs = loc.opt(TensorKind::RopeFreqs, None, &[half_rot])?;
        // LongRoPE: both factor sets or neither, with the context that separates them.
        let long_rope = match loc.opt(TensorKind::RopeFactorsLong, None, &[half_rot])? {
            None => None,
            Some(long) => {
                let short = loc.req(TensorKind::RopeFactorsShort, None, &[half_rot])?;
                let Some(orig_ctx) = hp.rope_orig_ctx else {
                    return Err(ModelError::BadHParam {
                        key: arch_key(hp.arch.name(), ArchKey::RopeScalingOrigCtx),
                        reason: "missing: LongRoPE factors need the original context".into(),
                    });
                };
                if rope_freqs.is_some() {
                    return Err(ModelError::UnsupportedFeature {
                        arch: hp.arch.name().to_string(),
                        what: "both rope_freqs and LongRoPE factors".into(),
                    });
                }
                Some(LongRopeRefs {
                    long,
                    short,
                    orig_ctx,
                })
            }
        };
        if long_rope.is_none() {
            // Short factors alone would be silently unused.
            loc.opt(TensorKind::RopeFactorsShort, None, &[half_rot])?
                .map_or(Ok(()), |t| {
                    Err(ModelError::MissingTensor {
                        name: format!(
                            "{} (beside {})",
                            tensor_name(TensorKind::RopeFactorsLong, None),
                            t.name
                        ),
                    })
                })?;
        }
        let (q, k, v) = (hp.q_dim() as u64, hp.k_dim() as u64, hp.v_dim() as u64);
        let o_in = (hp.n_head * hp.head_dim_v) as u64;
        let ff = hp.n_ff as u64;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for l in 0..hp.n_layer {
            let at = Some(l);
            let bias = |loc: &mut Locator, kind, n| -> Result<Option<TensorRef>, ModelError> {
                if hp.arch.has_qkv_bias() {
                    loc.req(kind, at, &[n]).map(Some)
                } else {
                    // Some llama conversions carry biases too; use them when present.
                    loc.opt(kind, at, &[n])
                }
            };
            // Family extras: required where the architecture has them, and otherwise not looked
            // up (so a stray one is reported as unused, never silently skipped).
            let extra =
                |loc: &mut Locator, has: bool, kind, n| -> Result<Option<TensorRef>, ModelError> {
                    if has {
                        loc.req(kind, at, &[n]).map(Some)
                    } else {
                        Ok(None)
                    }
                };
            let (qk, post) = (hp.arch.has_qk_norm(), hp.arch.has_post_norms());
            let hd = hp.head_dim as u64;
            let fused = hp.arch.has_fused_projections();
            let (wq, wk, wv) = if fused {
                // Phi-3: one matrix, Q rows then K rows then V rows.
                let qkv = loc.req(TensorKind::AttnQkv, at, &[d, q + k + v])?;
                let (q, k, v) = (q as usize, k as usize, v as usize);
                (
                    qkv.row_block(0, q),
                    qkv.row_block(q, k),
                    qkv.row_block(q + k, v),
                )
            } else {
                (
                    loc.req(TensorKind::AttnQ, at, &[d, q])?,
                    loc.req(TensorKind::AttnK, at, &[d, k])?,
                    loc.req(TensorKind::AttnV, at, &[d, v])?,
                )
            };
            let (w_gate, w_up, w_down, router) = match hp.moe {
                Some(moe) => {
                    // The experts stacked along the last GGUF dimension: expert e is a block
                    // of rows of the [n_expert * rows, cols] matrix each tensor is in memory.
                    let (ne, fe) = (moe.n_expert as u64, moe.n_ff_exp as u64);
                    (
                        loc.req(TensorKind::FfnGateExps, at, &[d, fe, ne])?,
                        loc.req(TensorKind::FfnUpExps, at, &[d, fe, ne])?,
                        loc.req(TensorKind::FfnDownExps, at, &[fe, d, ne])?,
                        Some(loc.req(TensorKind::FfnGateInp, at, &[d, ne])?),
                    )
                }
                None if fused => {
                    // Phi-3: `ffn_up` holds gate rows then up rows.
                    let gate_up = loc.req(TensorKind::FfnUp, at, &[d, 2 * ff])?;
                    let ff = ff as usize;
                    (
                        gate_up.row_block(0, ff),
                        gate_up.row_block(ff, ff),
                        loc.req(TensorKind::FfnDown, at, &[ff as u64, d])?,
                        None,
                    )
                }
                None => (
                    loc.req(TensorKind::FfnGate, at, &[d, ff])?,
                    loc.req(TensorKind::FfnUp, at, &[d, ff])?,
                    loc.req(TensorKind::FfnDown, at, &[ff, d])?,
                    None,
                ),
            };
            // Qwen2-MoE's shared expert: a gate logit per token and a dense FFN.
            let shexp = match hp.moe.and_then(|m| m.n_ff_shexp) {
                Some(fs) => {
                    let fs = fs as u64;
                    (
                        // `[d, 1]`: a one-row matrix (the converter may quantize it).
                        Some(loc.req(TensorKind::FfnGateInpShexp, at, &[d, 1])?),
                        Some(loc.req(TensorKind::FfnGateShexp, at, &[d, fs])?),
                        Some(loc.req(TensorKind::FfnUpShexp, at, &[d, fs])?),
                        Some(loc.req(TensorKind::FfnDownShexp, at, &[fs, d])?),
                    )
                }
                None => (None, None, None, None),
            };
            layers.push(LayerRefs {
                attn_norm: loc.req(TensorKind::AttnNorm, at, &[d])?,
                wq,
                wk,
                wv,
                bq: bias(&mut loc, TensorKind::AttnQBias, q)?,
                bk: bias(&mut loc, TensorKind::AttnKBias, k)?,
                bv: bias(&mut loc, TensorKind::AttnVBias, v)?,
                wo: loc.req(TensorKind::AttnOutput, at, &[o_in, d])?,
                ffn_norm: loc.req(TensorKind::FfnNorm, at, &[d])?,
                w_gate,
                w_up,
                w_down,
                q_norm: extra(&mut loc, qk, TensorKind::AttnQNorm, hd)?,
                k_norm: extra(&mut loc, qk, TensorKind::AttnKNorm, hd)?,
                attn_post_norm: extra(&mut loc, post, TensorKind::AttnPostNorm, d)?,
                ffn_post_norm: extra(&mut loc, post, TensorKind::FfnPostNorm, d)?,
                router,
                shexp_gate_inp: shexp.0,
                shexp_gate: shexp.1,
                shexp_up: shexp.2,
                shexp_down: shexp.3,
            });
        }
        if let Some(t) = file.tensors().iter().find(|t| !loc.used.contains(&t.name)) {
            return Err(ModelError::UnusedTensor {
                name: t.name.clone(),
                arch: hp.arch.name().to_string(),
            });
        }
        Ok(Self {
            token_embd,
            output_norm,
            output,
            rope_freqs,
            long_rope,
            layers,
            n_vocab,
        })
    }

    /// The output head: `output.weight`, or the tied embedding matrix.
    pub fn head(&self) -> &TensorRef {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}
