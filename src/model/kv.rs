//! The KV cache of one sequence and the sequence state the forward pass advances.

use super::error::ModelError;
use super::hparams::HParams;
use super::ops::Precision;
use half::f16;
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use serde::{Deserialize, Serialize};

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    F32,
    F16,
}

/// Default context when the user gives none (capped by the model's trained context).
pub const DEFAULT_CTX: usize = 4096;

#[derive(Debug)]
enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvBuf {
    fn new(ty: KvType, n: usize) -> Self {
        // Zeroed allocations come from calloc/mmap: pages a short sequence never touches stay
        // out of resident memory.
        match ty {
            KvType::F32 => Self::F32(vec![0.0; n]),
            // `vec![f16::ZERO; n]` would write every element (the zero-alloc fast path only
            // knows primitive types), making the whole cache resident up front.
            KvType::F16 => Self::F16(vec![0u16; n].reinterpret_into()),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            Self::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::F16(v) => v.len() * 2,
        }
    }
}

/// Rows of one KV head, `[ctx, dim]`, as stored.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> KvRows<'a> {
    /// All rows as one f32 slice: borrowed from an f32 cache, converted into `buf` from f16.
    pub fn as_f32<'b>(&self, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            KvRows::F32(v) => v,
            KvRows::F16(v) => {
                buf.resize(v.len(), 0.0);
                v.convert_to_f32_slice(buf);
                buf
            }
        }
    }
}

/// Keys and values of every layer, `[layer, kv_head, ctx, head_dim]`: positions of one head are
/// contiguous, which is what attention reads.
#[derive(Debug)]
pub struct KvCache {
    ty: KvType,
    ctx: usize,
    n_head_kv: usize,
    dk: usize,
    dv: usize,
    k: KvBuf,
    v: KvBuf,
}

impl KvCache {
    pub fn new(hp: &HParams, ctx: usize, ty: KvType) -> Self {
        let n = hp.n_layer * hp.n_head_kv * ctx;
        Self {
            ty,
            ctx,
            n_head_kv: hp.n_head_kv,
            dk: hp.head_dim,
            dv: hp.head_dim_v,
            k: KvBuf::new(ty, n * hp.head_dim),
            v: KvBuf::new(ty, n * hp.head_dim_v),
        }
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    pub fn kv_type(&self) -> KvType {
        self.ty
    }

    /// Bytes held by the cache (allocated; resident only as far as written).
    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }

    fn base(&self, layer: usize, head: usize) -> usize {
        (layer * self.n_head_kv + head) * self.ctx
    }

    /// Stores position `pos` of `layer`: `k` is `[n_head_kv, dk]`, `v` is `[n_head_kv, dv]`.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        for h in 0..self.n_head_kv {
            let at = self.base(layer, h) + pos;
            self.k
                .write(at * self.dk, &k[h * self.dk..(h + 1) * self.dk]);
            self.v
                .write(at * self.dv, &v[h * self.dv..(h + 1) * self.dv]);
        }
    }

    /// The first `len` key and value rows of one KV head.
    pub fn head(&self, layer: usize, head: usize, len: usize) -> (KvRows<'_>, KvRows<'_>) {
        let b = self.base(layer, head);
        fn slice(buf: &KvBuf, r: std::ops::Range<usize>) -> KvRows<'_> {
            match buf {
                KvBuf::F32(v) => KvRows::F32(&v[r]),
                KvBuf::F16(v) => KvRows::F16(&v[r]),
            }
        }
        (
            slice(&self.k, b * self.dk..(b + len) * self.dk),
            slice(&self.v, b * self.dv..(b + len) * self.dv),
        )
    }
}

/// Options of a new sequence.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SequenceConfig {
    /// Context length in tokens; `None` is `DEFAULT_CTX`. Capped by the model's.
    pub ctx: Option<usize>,
    pub precision: Precision,
    /// `None`: f32 for `Exact`, f16 for `Fast` (as llama.cpp).
    pub kv_type: Option<KvType>,
}

impl SequenceConfig {
    /// The context a sequence of `hp`'s model gets: the user's (default `DEFAULT_CTX`) capped
    /// by the model's trained context.
    pub fn context_len(&self, hp: &HParams) -> usize {
        self.ctx.unwrap_or(DEFAULT_CTX).min(hp.n_ctx_train)
    }
}

impl Default for SequenceConfig {
    fn default() -> Self {
        Self {
            ctx: None,
            precision: Precision::Fast,
            kv_type: None,
        }
    }
}

/// Scratch buffers of the forward pass, grown to the largest batch seen and then reused, so
/// decoding allocates nothing per token.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub hidden: Vec<f32>,
    pub xn: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// `[n_head, n_tokens, head_dim_v]`: each head's output is contiguous for the parallel loop.
    pub heads: Vec<f32>,
    pub attn: Vec<f32>,
    pub proj: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    /// `[n_head, ctx]` attention scores.
    pub scores: Vec<f32>,
    pub norm_w: Vec<f32>,
    pub bias: Vec<f32>,
    /// `[n_tokens, n_rot]` cos/sin pairs.
    pub rope_cs: Vec<f32>,
    pub logits: Vec<f32>,
}

pub(crate) fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// One sequence: its KV cache, its position and its scratch space.
#[derive(Debug)]
pub struct Sequence {
    pub(crate) kv: KvCache,
    pos: usize,
    precision: Precision,
    pub(crate) scratch: Scratch,
}

impl Sequence {
    /// A sequence for `hp`'s model. The context is the user's (default 4096) capped by the
    /// model's trained context.
    pub fn new(hp: &HParams, cfg: SequenceConfig) -> Result<Self, ModelError> {
        let ctx = cfg.context_len(hp);
        if ctx == 0 {
            return Err(ModelError::BadHParam {
                key: "context length".into(),
                reason: "must be at least 1".into(),
            });
        }
        let ty = cfg.kv_type.unwrap_or(match cfg.precision {
            Precision::Exact => KvType::F32,
            Precision::Fast => KvType::F16,
        });
        Ok(Self {
            kv: KvCache::new(hp, ctx, ty),
            pos: 0,
            precision: cfg.precision,
            scratch: Scratch::default(),
        })
    }

    /// Tokens already in the cache.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn ctx(&self) -> usize {
        self.kv.ctx()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Marks `n` more tokens as cached, after every layer ran over them.
    pub fn advance(&mut self, n: usize) -> Result<(), ModelError> {
        self.check_room(n)?;
        self.pos += n;
        Ok(())
    }

    /// Errors when `n` more tokens would not fit.
    pub fn check_room(&self, n: usize) -> Result<(), ModelError> {
        if self.pos + n > self.ctx() {
            return Err(ModelError::ContextOverflow {
                needed: self.pos + n,
                ctx: self.ctx(),
            });
        }
        Ok(())
    }

    /// Forgets every cached token (keeps the allocation).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Drops cached tokens after `pos` (regeneration, chat edits).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }
}
