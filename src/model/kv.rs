//! The KV cache of one sequence (a block table into a [`KvPool`]) and
//! the sequence state the forward pass advances.

use super::error::ModelError;
use super::hparams::HParams;
use super::ops::Precision;
use super::paged::{lock, prefix_hashes, BlockId, KvPool, SharedKvPool, DEFAULT_BLOCK_TOKENS};
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
pub(crate) enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// Element types whose all-zero bit pattern is a valid value (0.0 and 0), so a zeroed
/// allocation is an initialised `Vec`.
///
/// # Safety
/// Implement only for types where every value of all-zero bytes is valid.
unsafe trait ZeroIsValid {}
// SAFETY: all-zero bits are 0.0f32 and 0u16.
unsafe impl ZeroIsValid for f32 {}
// SAFETY: see above.
unsafe impl ZeroIsValid for u16 {}

/// `n` zeroed elements, or `ModelError::Alloc` where `vec![0; n]` would abort the process when
/// the allocator refuses (the size comes from the file and the request). Zeroed allocations
/// come from calloc/mmap: pages a short sequence never touches stay out of resident memory,
/// which `try_reserve` + `resize` would lose by writing every element.
fn try_zeroed<T: ZeroIsValid>(n: usize, what: &'static str) -> Result<Vec<T>, ModelError> {
    let err = || ModelError::Alloc {
        what,
        bytes: n as u128 * std::mem::size_of::<T>() as u128,
    };
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| err())?;
    // SAFETY: `layout` has a non-zero size (n > 0 and T is not zero-sized, checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(err());
    }
    // SAFETY: `ptr` comes from the global allocator with `Layout::array::<T>(n)`, the layout a
    // `Vec<T>` of capacity `n` frees with; its `n` elements are initialised, because all-zero
    // bytes are a valid `T` (`ZeroIsValid`).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

impl KvBuf {
    pub(crate) fn new(ty: KvType, n: usize) -> Result<Self, ModelError> {
        Ok(match ty {
            KvType::F32 => Self::F32(try_zeroed::<f32>(n, "KV cache")?),
            // Zeroed u16s reinterpreted: `vec![f16::ZERO; n]` would write every element
            // (the zero-alloc fast path only knows primitive types).
            KvType::F16 => Self::F16(try_zeroed::<u16>(n, "KV cache")?.reinterpret_into()),
        })
    }

    pub(crate) fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            Self::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// Copies elements `src..src + n` to `dst..dst + n`.
    pub(crate) fn copy_within(&mut self, src: usize, dst: usize, n: usize) {
        match self {
            Self::F32(v) => v.copy_within(src..src + n, dst),
            Self::F16(v) => v.copy_within(src..src + n, dst),
        }
    }

    /// Elements `at..at + dst.len()` as f32.
    pub(crate) fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            Self::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
            Self::F16(v) => {
                let src = &v[at..at + dst.len()];
                // The quant kernels' F16C loop (exact, as half's): half's slice conversion calls
                // a helper per 8 values, which showed in profiles of batched decode.
                let bytes: &[u8] = bytemuck::cast_slice(src);
                if crate::quant::dequantize(crate::quant::GgmlType::F16, bytes, dst).is_err() {
                    src.convert_to_f32_slice(dst);
                }
            }
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::F16(v) => v.len() * 2,
        }
    }
}

/// The KV cache of one sequence: its block table into a pool (a private one, or the pool a
/// runtime shares between its sequences) and its context length. Blocks are taken as the
/// sequence grows (or up front, [`Self::reserve`]) and go back to the pool when it is dropped.
#[derive(Debug)]
pub struct KvCache {
    pool: SharedKvPool,
    table: Vec<BlockId>,
    ctx: usize,
    ty: KvType,
}

impl KvCache {
    /// A cache of `ctx` positions in a pool of its own (every block taken now): the
    /// single-sequence case. Size it first with [`SequenceConfig::fit_context`].
    pub fn new(hp: &HParams, ctx: usize, ty: KvType) -> Result<Self, ModelError> {
        let pool = KvPool::new(
            hp,
            ty,
            DEFAULT_BLOCK_TOKENS,
            ctx.div_ceil(DEFAULT_BLOCK_TOKENS),
        )?;
        let mut c = Self::in_pool(pool.shared(), ctx);
        c.reserve(ctx)?;
        Ok(c)
    }

    /// An empty cache of up to `ctx` positions drawing blocks from `pool`.
    pub fn in_pool(pool: SharedKvPool, ctx: usize) -> Self {
        let ty = lock(&pool).kv_type();
        Self {
            pool,
            table: Vec::new(),
            ctx,
            ty,
        }
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    pub fn kv_type(&self) -> KvType {
        self.ty
    }

    pub fn pool(&self) -> &SharedKvPool {
        &self.pool
    }

    /// The pool's block ids holding this sequence's positions, in order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.table
    }

    /// Bytes held by the cache's blocks (allocated; resident only as far as written).
    pub fn bytes(&self) -> usize {
        let p = lock(&self.pool);
        self.table.len() * p.stats().block_bytes as usize
    }

    /// Takes blocks until the first `tokens` positions (capped by the context) have room;
    /// all or none: `ModelError::KvPoolFull` when the pool has too few free.
    pub fn reserve(&mut self, tokens: usize) -> Result<(), ModelError> {
        let mut p = lock(&self.pool);
        let need = p
            .blocks_for(tokens.min(self.ctx))
            .saturating_sub(self.table.len());
        if need == 0 {
            return Ok(());
        }
        let a = p.allocator_mut();
        match a.alloc_n(need) {
            Some(b) => {
                self.table.extend(b);
                Ok(())
            }
            None => Err(ModelError::KvPoolFull {
                needed: need,
                free: a.free(),
                total: a.total(),
                block_tokens: p.block_tokens(),
            }),
        }
    }

    /// Starts an empty cache from the longest cached prefix of `tokens` (whole blocks, and at
    /// most `tokens.len() - 1` positions so at least one token is still fed); returns the
    /// positions it holds.
    pub fn adopt_prefix(&mut self, tokens: &[u32]) -> usize {
        if !self.table.is_empty() || tokens.is_empty() {
            return 0;
        }
        let mut p = lock(&self.pool);
        let bt = p.block_tokens();
        let usable = (tokens.len() - 1).min(self.ctx);
        let hashes = prefix_hashes(&tokens[..usable - usable % bt], bt);
        let found = p.prefix_lookup(&hashes);
        let n = found.len() * bt;
        drop(p);
        self.table = found;
        n
    }

    /// Offers the full blocks of the first `tokens.len()` positions (which this cache holds)
    /// to the prefix cache.
    pub fn publish_prefix(&mut self, tokens: &[u32]) {
        let mut p = lock(&self.pool);
        let hashes = prefix_hashes(tokens, p.block_tokens());
        for (h, &b) in hashes.iter().zip(&self.table) {
            p.prefix_insert(*h, b);
        }
    }

    /// Makes the blocks from position `pos` on this cache's own before it writes there
    /// again: a block shared with the prefix cache or another sequence that holds `pos`
    /// mid-block is copied; shared blocks wholly past `pos` are given back. Returns `pos`, or
    /// the start of its block when no block is free for the copy.
    pub fn own_from(&mut self, pos: usize) -> usize {
        let mut p = lock(&self.pool);
        let bt = p.block_tokens();
        let first = pos / bt;
        let shared = |p: &KvPool, b: BlockId| p.allocator().refcount(b) > 1 || p.is_cached(b);
        // Whole blocks past `pos`: from the first shared one on, give them back.
        if let Some(i) = (first + usize::from(!pos.is_multiple_of(bt))..self.table.len())
            .find(|&i| shared(&p, self.table[i]))
        {
            for b in self.table.drain(i..) {
                p.allocator_mut().release(b);
            }
        }
        if pos.is_multiple_of(bt) || first >= self.table.len() || !shared(&p, self.table[first]) {
            return pos;
        }
        match p.allocator_mut().alloc() {
            Some(fresh) => {
                let old = self.table[first];
                p.copy_block(old, fresh);
                p.allocator_mut().release(old);
                self.table[first] = fresh;
                pos
            }
            None => {
                for b in self.table.drain(first..) {
                    p.allocator_mut().release(b);
                }
                first * bt
            }
        }
    }

    /// Gives back the blocks past the first `tokens` positions.
    pub fn release_after(&mut self, tokens: usize) {
        let mut p = lock(&self.pool);
        let keep = p.blocks_for(tokens);
        for b in self.table.drain(keep.min(self.table.len())..) {
            p.allocator_mut().release(b);
        }
    }

    /// Stores positions `pos0..` of `layer`: `k` is `[n, n_head_kv, dk]`, `v` is
    /// `[n, n_head_kv, dv]`; takes blocks for them first where needed.
    pub fn store(
        &mut self,
        layer: usize,
        pos0: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(), ModelError> {
        self.reserve(pos0 + n)?;
        lock(&self.pool).write(&self.table, layer, pos0, k, v)
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.release_after(0);
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

    /// The KV element type: the configured one, else f32 for `Exact` and f16 for `Fast`.
    pub fn kv_type_or_default(&self) -> KvType {
        self.kv_type.unwrap_or(match self.precision {
            Precision::Exact => KvType::F32,
            Precision::Fast => KvType::F16,
        })
    }

    /// [`Self::context_len`] sized against `limit` before anything is allocated: the whole
    /// context when it fits, else as many tokens as fit (the caller warns: [`ContextFit::capped`]),
    /// else, when not even `min(MIN_CTX, requested)` tokens fit, `ModelError::KvTooLarge`.
    /// Capping rather than refusing outright keeps a model usable whose trained context
    /// (or the default 4096) is merely larger than this machine; a model of which only a
    /// handful of tokens fit is refused, as no prompt worth serving would fit. `None`: no limit
    /// is known (allocation failures are still errors, see [`KvCache::new`]).
    pub fn fit_context(
        &self,
        hp: &HParams,
        limit: Option<&KvLimit>,
    ) -> Result<ContextFit, ModelError> {
        let requested = self.context_len(hp);
        if requested == 0 {
            return Err(ModelError::BadHParam {
                key: "context length".into(),
                reason: "must be at least 1".into(),
            });
        }
        let per_token = bytes_per_token(hp, self.kv_type_or_default());
        let fit = |ctx: usize| ContextFit {
            ctx,
            requested,
            bytes: per_token * ctx as u128,
        };
        let Some(limit) = limit else {
            return Ok(fit(requested));
        };
        let fits = limit.bytes as u128 / per_token;
        if fits >= requested as u128 {
            return Ok(fit(requested));
        }
        let min_ctx = requested.min(MIN_CTX);
        if fits >= min_ctx as u128 {
            // fits < requested, a usize.
            return Ok(fit(fits as usize));
        }
        Err(ModelError::KvTooLarge {
            ctx: requested,
            bytes: per_token * requested as u128,
            per_token,
            limit: limit.bytes,
            limit_from: limit.from.clone(),
            min_ctx,
        })
    }
}

/// The fewest tokens a capped context keeps; a model of which fewer fit is refused.
pub const MIN_CTX: usize = 256;

/// Bytes one context position costs a sequence: its keys and values in every layer, plus its
/// column of the `[n_head, ctx]` f32 attention scores. u128: a hostile file's dimensions
/// multiply past u64.
pub fn bytes_per_token(hp: &HParams, ty: KvType) -> u128 {
    let el: u128 = match ty {
        KvType::F32 => 4,
        KvType::F16 => 2,
    };
    hp.n_layer as u128 * hp.n_head_kv as u128 * (hp.head_dim as u128 + hp.head_dim_v as u128) * el
        + hp.n_head as u128 * 4
}

/// What [`SequenceConfig::fit_context`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextFit {
    /// The context to use.
    pub ctx: usize,
    /// The context asked for (the user's or the default, capped by the trained context).
    pub requested: usize,
    /// Bytes of KV cache and attention scores at `ctx`.
    pub bytes: u128,
}

impl ContextFit {
    /// Whether the context was cut below the one asked for (worth a warning).
    pub fn capped(&self) -> bool {
        self.ctx < self.requested
    }
}

/// The most bytes one sequence's KV cache (and scores) may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLimit {
    pub bytes: u64,
    /// Where the number came from, for messages.
    pub from: String,
}

impl KvLimit {
    /// A limit the caller set (`RuntimeBuilder::kv_limit`; the CLI takes it from
    /// `ROCMFORGE_KV_LIMIT`): for containers whose memory limit the kernel's counters do not
    /// show, and for tests.
    pub fn configured(bytes: u64) -> Self {
        Self {
            bytes,
            from: format!("the configured KV limit, {bytes} bytes"),
        }
    }

    /// Half of the memory available now (`MemAvailable`, or the cgroup's room when smaller):
    /// the weights, the runtime's buffers and the other sequences need the rest. `None` where
    /// neither can be read (no limit is enforced then).
    pub fn host() -> Option<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| mem_available(&s));
        let cgroup = cgroup_room();
        let (avail, what) = match (meminfo, cgroup) {
            (Some(m), Some(c)) if c < m => (c, "the cgroup's memory.max room"),
            (Some(m), _) => (m, "MemAvailable"),
            (None, Some(c)) => (c, "the cgroup's memory.max room"),
            (None, None) => return None,
        };
        Some(Self {
            bytes: avail / 2,
            from: format!("half of {what}, {avail} bytes"),
        })
    }

    /// [`Self::configured`] when `configured` is set, else [`Self::host`].
    pub fn configured_or_host(configured: Option<u64>) -> Option<Self> {
        configured.map(Self::configured).or_else(Self::host)
    }
}

/// `MemAvailable` of `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// cgroup v2 `memory.max - memory.current` of this process's group (`None`: no limit, v1, or
/// unreadable).
fn cgroup_room() -> Option<u64> {
    let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" means no limit
    let cur = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(cur))
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
/// decoding allocates nothing per token. A sequence has its own; a batched step
/// ([`Model::forward_layer_batch`](super::Model::forward_layer_batch)) uses its caller's.
#[derive(Debug, Default)]
pub struct Scratch {
    pub(crate) hidden: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// `[n_head, n_tokens, head_dim_v]`: each head's output is contiguous for the parallel loop.
    pub(crate) heads: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) proj: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    /// `[n_head, ctx]` attention scores.
    pub(crate) scores: Vec<f32>,
    pub(crate) norm_w: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    /// `[n_tokens, n_rot]` cos/sin pairs.
    pub(crate) rope_cs: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    /// The last MoE router's choice and the step's precision, for experts run from units of
    /// their own ([`Model::forward_expert`](super::Model::forward_expert)).
    pub(crate) routes: super::moe::Routes,
    pub(crate) routes_prec: super::ops::Precision,
}

/// `v`'s first `n` elements, growing it first; an error instead of an abort when the allocator
/// refuses (`n` grows with the request's tokens and the model's widths).
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) -> Result<&mut [f32], ModelError> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len())
            .map_err(|_| ModelError::Alloc {
                what: "forward-pass scratch",
                bytes: n as u128 * 4,
            })?;
        v.resize(n, 0.0);
    }
    Ok(&mut v[..n])
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
    /// model's trained context; a cache the allocator refuses is an error for this sequence.
    pub fn new(hp: &HParams, cfg: SequenceConfig) -> Result<Self, ModelError> {
        let ctx = cfg.context_len(hp);
        if ctx == 0 {
            return Err(ModelError::BadHParam {
                key: "context length".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            kv: KvCache::new(hp, ctx, cfg.kv_type_or_default())?,
            pos: 0,
            precision: cfg.precision,
            scratch: Scratch::default(),
        })
    }

    /// A sequence drawing its KV blocks from `pool` (shared with other sequences) as it grows;
    /// the pool's element type wins over `cfg.kv_type`.
    pub fn in_pool(
        hp: &HParams,
        cfg: SequenceConfig,
        pool: SharedKvPool,
    ) -> Result<Self, ModelError> {
        let ctx = cfg.context_len(hp);
        if ctx == 0 {
            return Err(ModelError::BadHParam {
                key: "context length".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            kv: KvCache::in_pool(pool, ctx),
            pos: 0,
            precision: cfg.precision,
            scratch: Scratch::default(),
        })
    }

    /// Takes KV blocks now for the first `tokens` positions (capped by the context), so the
    /// sequence cannot run out of blocks before then; all or none.
    pub fn reserve(&mut self, tokens: usize) -> Result<(), ModelError> {
        self.kv.reserve(tokens)
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

    /// Drops cached tokens after `pos` (regeneration, chat edits). Their blocks stay with the
    /// sequence (the next tokens overwrite them); [`Self::release_unused`] gives them back.
    /// A block shared with others (the prefix cache) is never overwritten: it is copied first,
    /// or, with no block free for the copy, the sequence keeps only the whole blocks before
    /// it. Returns the position kept.
    pub fn truncate(&mut self, pos: usize) -> usize {
        self.pos = self.kv.own_from(self.pos.min(pos));
        self.pos
    }

    /// Starts a new sequence from the longest prefix of `tokens` the pool's prefix cache holds
    /// (whole blocks, leaving at least one token to feed); returns the positions it got.
    pub fn adopt_prefix(&mut self, tokens: &[u32]) -> usize {
        if self.pos != 0 {
            return 0;
        }
        self.pos = self.kv.adopt_prefix(tokens);
        self.pos
    }

    /// Offers the full blocks of the cached `tokens` (this sequence's first positions) to the
    /// prefix cache, for later sequences that start with them.
    pub fn publish_prefix(&mut self, tokens: &[u32]) {
        let n = tokens.len().min(self.pos);
        self.kv.publish_prefix(&tokens[..n]);
    }

    /// Gives the blocks past the cached tokens back to the pool (a sequence kept idle between
    /// a chat's turns holds only what it caches).
    pub fn release_unused(&mut self) {
        self.kv.release_after(self.pos);
    }
}
