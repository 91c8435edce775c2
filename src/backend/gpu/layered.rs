//! The llama forward pass one step at a time over weights the pipelined runtime keeps in device
//! memory: [`crate::backend::LayeredForward`] for any [`KernelDevice`] (CUDA and HIP alike).
//! The layer math is the model's one block ([`crate::model::run_block`]) run by
//! [`super::layer::run_layer`]; each step is handed device tensors inside
//! regions the pipeline's uploader filled (and may evict after the step).

use std::sync::Arc;

use super::gemm::{DeferredGemm, GemmF16, PortableGemm};
use super::layer::{
    bad, batched_decode, linear_q, mat, run_layer, run_layer_routed, vec_f32, Gemm, KvPoolView,
    LayerCtx, Scratch, Segment,
};
use super::ops::{seq_kv_entry, GpuOps, KvBlocks, KvLayout, ATTN_MAX_HEAD_DIM};
use super::{BufferIo, GpuForwardError, KernelDevice, Result, View};
use crate::backend::{
    DeviceBuffer, DeviceStream, DeviceTensor, LayerTensors, LayeredForward, RowLogits,
};
use crate::model::kv::KvType;
use crate::model::paged::lock;
use crate::model::{
    moe::Routes, Act, BlockOps, HParams, KvCache, KvPool, Model, ModelError, RopeScaling,
    SharedKvPool, DEFAULT_BLOCK_TOKENS,
};

/// Options of [`GpuLayered::new`].
#[derive(Debug, Clone, Copy)]
pub struct LayeredOptions {
    /// KV cache capacity in tokens (per sequence).
    pub ctx: usize,
    /// Most tokens one step takes (prompts are embedded in one batch: longer ones are refused).
    pub max_batch: usize,
    /// GEMMs of batches of 8 tokens or more: the vendor library (cuBLAS) when it loads, else
    /// the portable kernel (`kernels/gemm.cu`); `false`: always the portable kernel.
    pub use_blas: bool,
    /// Sequences one step may carry (continuous batching); each has its own block table in
    /// the one KV pool.
    pub max_seqs: usize,
    /// Matrix-vector products (decode, short batches) with activations quantized to 8 bits
    /// and integer dot products (`kernels/mmvq_q8.cu`), as the CPU's fast precision; `false`:
    /// f32 activations (the exact precision).
    pub q8_activations: bool,
}

impl Default for LayeredOptions {
    fn default() -> Self {
        Self {
            ctx: 4096,
            max_batch: 512,
            use_blas: true,
            max_seqs: 16,
            q8_activations: true,
        }
    }
}

/// Bytes of one f16 weight tile of the GEMM path.
const TILE_ROWS_BYTES: usize = 64 << 20;

/// The [`LayeredForward`] of a GPU: compute stream, activations, the prefill GEMM.
pub struct GpuLayered<D: KernelDevice> {
    dev: Arc<D>,
    hp: HParams,
    n_vocab: usize,
    stream: D::Stream,
    s: Scratch<D::Buf>,
    /// The vendor library or the portable kernel (see [`LayeredOptions::use_blas`]).
    gemm: Box<dyn GemmF16<D>>,
    max_batch: usize,
    kv_layout: KvLayout,
    freq_scale: f32,
    /// The model's RoPE frequency divisors (`rope_freqs`, `[n_rot / 2]` f32), when it has them.
    rope_factors: Option<D::Buf>,
    /// Rows embedded by the last `embed_rows`.
    n: usize,
    /// The step's sequences: (first row, rows, position of the first), from `set_segments`.
    segs: Vec<(usize, usize, usize)>,
    /// This step's batched-decode sequence table (`s.seqs`): `None` until the first layer
    /// writes it, then the number of entries (0: the step has fewer than two such sequences).
    seq_table: Option<usize>,
    max_seqs: usize,
    /// [`LayeredOptions::q8_activations`].
    q8: bool,
    /// Steps of at least this many rows take the GEMM (`layer::gemm_min_tokens` of the device).
    gemm_min_tokens: usize,
    /// The last MoE router's choice, for the experts of a routed layer.
    routes: Routes,
    /// The sequences' KV pool (`None` until [`LayeredForward::configure_kv`] or the first
    /// [`LayeredForward::new_kv`]).
    pool: Option<DevicePool<D::Buf>>,
    /// Entries of one sequence's row of `s.tables`: the blocks of a full context.
    table_len: usize,
}

/// The KV pool on the device: one buffer of `blocks` (`model::paged`'s layout, which the
/// kernels read through each sequence's block table), and its bookkeeping, which every
/// sequence's [`KvCache`] shares (the allocator, the prefix cache).
struct DevicePool<B> {
    buf: B,
    blocks: KvBlocks,
    book: SharedKvPool,
}

/// Device memory the default KV pool leaves free (the vendor libraries' workspaces, a
/// streamed layer's slot coming later).
const POOL_HEADROOM_BYTES: u64 = 512 << 20;

/// `b`: rows of a step; `seqs`: sequences of a step (rows whose logits come back); `ctx`: the
/// option a sequence's capacity comes from.
fn scratch_bytes(
    hp: &HParams,
    n_vocab: usize,
    b: usize,
    seqs: usize,
    ctx: usize,
) -> [(usize, &'static str); 20] {
    let max_cols = hp.n_embd.max(hp.n_ff).max(hp.q_dim());
    [
        (b * hp.n_embd * 4, "scratch hidden"),
        (b * hp.n_embd.max(hp.q_dim()) * 4, "scratch xn"),
        (b * hp.q_dim() * 4, "scratch q"),
        (b * hp.k_dim() * 4, "scratch k"),
        (b * hp.v_dim() * 4, "scratch v"),
        (b * hp.q_dim() * 4, "scratch attn"),
        (b * hp.n_embd * 4, "scratch proj"),
        (b * hp.n_ff * 4, "scratch gate"),
        (b * hp.n_ff * 4, "scratch up"),
        (seqs * n_vocab * 4, "logits"),
        (b * 4, "ids"),
        (b * 4, "positions"),
        (4, "status"),
        (seqs.max(1) * 4, "greedy tokens"),
        (b * max_cols * 2, "f16 activations"),
        (TILE_ROWS_BYTES, "f16 weight tile"),
        (
            // The step's q8a, then room for a tensor-core batch's packed copy (ops::mma_pack_at).
            crate::backend::kernels::q8a_bytes(b.max(seqs), max_cols.div_ceil(32) * 32)
                + super::ops::mma_pack_bytes(max_cols.div_ceil(32) * 32)
                + 16,
            "8-bit activations",
        ),
        (
            super::ops::attn_part_bytes(hp.n_head, hp.head_dim.max(hp.head_dim_v)),
            "attention partials",
        ),
        (
            seqs * super::ops::SEQ_KV_ENTRY_BYTES,
            "batched decode sequence table",
        ),
        (seqs * table_len(kv_cap(hp, ctx)) * 4, "KV block tables"),
    ]
}

/// A sequence's KV capacity for the option `ctx`: capped by the training length.
fn kv_cap(hp: &HParams, ctx: usize) -> usize {
    ctx.min(hp.n_ctx_train).max(1)
}

/// Entries of a block table covering `cap` positions.
fn table_len(cap: usize) -> usize {
    cap.div_ceil(DEFAULT_BLOCK_TOKENS)
}

impl LayeredOptions {
    /// Device bytes a [`GpuLayered`] with one sequence needs besides weights: KV cache and
    /// activations (the weight budget's default leaves this free). The same on every vendor.
    pub fn reserve_bytes(&self, hp: &HParams, n_vocab: usize) -> usize {
        let scratch: usize = scratch_bytes(
            hp,
            n_vocab,
            self.max_batch.max(1),
            self.max_seqs.max(1),
            self.ctx,
        )
        .iter()
        .map(|(n, _)| *n)
        .sum();
        // Saturating: called before `GpuLayered::new` checks a hostile file's dimensions.
        let kv = self.kv_layout(hp);
        kv.n_kv_heads
            .saturating_mul(kv.seq_cap)
            .saturating_mul(kv.head_dim)
            .saturating_mul(2 * 2)
            .saturating_mul(hp.n_layer)
            .saturating_add(scratch)
    }

    /// One layer's K (or V) cache shape for `hp`: the context, capped by the training length.
    fn kv_layout(&self, hp: &HParams) -> KvLayout {
        KvLayout {
            n_kv_heads: hp.n_head_kv,
            head_dim: hp.head_dim,
            seq_cap: kv_cap(hp, self.ctx),
        }
    }
}

impl<D: KernelDevice> GpuLayered<D> {
    /// Checks that the pass supports `model` and allocates stream and activations.
    pub fn new(dev: Arc<D>, model: &Model, opt: LayeredOptions) -> Result<Self> {
        let hp = model.hparams().clone();
        let freq_scale = match hp.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
            RopeScaling::Yarn { .. } => {
                return Err(GpuForwardError::Unsupported("YaRN RoPE scaling".into()))
            }
        };
        if let Some(what) = hp.beyond_llama_graph() {
            return Err(GpuForwardError::Unsupported(what));
        }
        if model.layout().long_rope.is_some() {
            return Err(GpuForwardError::Unsupported(
                "LongRoPE scaling (rope_factors_long/short)".into(),
            ));
        }
        if hp.head_dim != hp.head_dim_v {
            return Err(GpuForwardError::Unsupported(
                "different K and V head widths".into(),
            ));
        }
        // attention.cu splits head_dim over a warp's lanes: on a wave64 device (CDNA) a
        // head_dim of 32 or 96 has no launch. Refused here rather than at the first layer.
        let warp = dev.warp_size() as usize;
        if warp == 0 || hp.head_dim % warp != 0 || hp.head_dim > ATTN_MAX_HEAD_DIM {
            return Err(GpuForwardError::Unsupported(format!(
                "head_dim {} on {} (attention needs a multiple of the {warp}-lane warp, at most {ATTN_MAX_HEAD_DIM})",
                hp.head_dim,
                dev.describe()
            )));
        }
        // One sequence's KV, sized before anything is allocated: a hostile file's dimensions
        // multiply past usize (wrapping to a small buffer in release), and a cache larger than
        // the device is refused here with the numbers, not at the first request.
        let kv_layout = opt.kv_layout(&hp);
        let per_token = 2 * 2 * (kv_layout.n_kv_heads as u128) * (kv_layout.head_dim as u128);
        let per_token = per_token * hp.n_layer as u128;
        let kv_bytes = per_token * kv_layout.seq_cap as u128;
        let (_, device_bytes) = dev.mem_info()?;
        if kv_bytes > device_bytes as u128 {
            return Err(ModelError::KvTooLarge {
                ctx: kv_layout.seq_cap,
                bytes: kv_bytes,
                per_token,
                limit: device_bytes as u64,
                limit_from: format!("all memory of {}", dev.describe()),
                min_ctx: kv_layout.seq_cap,
            }
            .into());
        }
        let b = opt.max_batch.max(1);
        let n_vocab = model.n_vocab();
        let bufs = scratch_bytes(&hp, n_vocab, b, opt.max_seqs.max(1), opt.ctx)
            .into_iter()
            .map(|(n, what)| dev.alloc(n.max(1), what))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut it = bufs.into_iter();
        let mut next = || {
            it.next().ok_or_else(|| {
                GpuForwardError::Unsupported("internal: scratch buffer count".into())
            })
        };
        let s = Scratch {
            hidden: next()?,
            xn: next()?,
            q: next()?,
            k: next()?,
            v: next()?,
            attn: next()?,
            proj: next()?,
            gate: next()?,
            up: next()?,
            logits: next()?,
            ids: next()?,
            pos: next()?,
            status: next()?,
            tok: next()?,
            x16: next()?,
            w16: next()?,
            xq: next()?,
            attn_part: next()?,
            seqs: next()?,
            tables: next()?,
        };
        s.status.zero()?;
        let rope_factors = match model.rope_freq_factors()? {
            Some(f) => {
                let b = dev.alloc(f.len() * 4, "rope frequency factors")?;
                b.write(0, &f)?;
                Some(b)
            }
            None => None,
        };
        let stream = dev.new_stream()?;
        let gemm_min_tokens = super::layer::gemm_min_tokens(dev.int8_mma());
        let gemm: Box<dyn GemmF16<D>> = if opt.use_blas {
            Box::new(DeferredGemm::new(dev.clone()))
        } else {
            Box::new(PortableGemm)
        };
        Ok(Self {
            kv_layout,
            dev,
            hp,
            n_vocab,
            stream,
            s,
            gemm,
            max_batch: b,
            freq_scale,
            rope_factors,
            n: 0,
            segs: Vec::new(),
            seq_table: None,
            max_seqs: opt.max_seqs.max(1),
            gemm_min_tokens,
            q8: opt.q8_activations,
            routes: Routes::default(),
            pool: None,
            table_len: table_len(kv_layout.seq_cap),
        })
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The prefill GEMM in use (`"cuBLAS"`, `"portable gemm.cu"`).
    pub fn gemm_name(&self) -> &'static str {
        self.gemm.name()
    }

    /// The planes of a KV block (`[layer][k|v]`).
    fn kv_planes(&self) -> usize {
        2 * self.hp.n_layer
    }

    /// Bytes of one pool block: every layer's K and V planes of `DEFAULT_BLOCK_TOKENS`
    /// positions (`model::paged::block_bytes` of f16).
    fn block_bytes(&self) -> usize {
        self.kv_planes() * self.kv_layout.plane_bytes(DEFAULT_BLOCK_TOKENS)
    }

    /// Allocates the KV pool: `bytes` of blocks, or by default every one of `max_seqs`
    /// sequences at its full context, as far as the device's free memory allows (less
    /// [`POOL_HEADROOM_BYTES`]); at least one full context, else `KvTooLarge`.
    fn make_pool(&mut self, bytes: Option<u64>) -> Result<()> {
        let per = self.block_bytes() as u64;
        let one_seq = table_len(self.kv_layout.seq_cap) as u64;
        let (free, total) = self.dev.mem_info()?;
        let fits = (free as u64).saturating_sub(POOL_HEADROOM_BYTES) / per.max(1);
        let blocks = match bytes {
            Some(b) => (b / per.max(1)).max(1),
            None => (one_seq * self.max_seqs as u64).min(fits).max(one_seq),
        }
        .min(u32::MAX as u64);
        if bytes.is_none() && blocks > fits {
            return Err(ModelError::KvTooLarge {
                ctx: self.kv_layout.seq_cap,
                bytes: blocks as u128 * per as u128,
                per_token: per as u128 / DEFAULT_BLOCK_TOKENS as u128,
                limit: free as u64,
                limit_from: format!(
                    "the free memory of {} ({} of {} bytes)",
                    self.dev.describe(),
                    free,
                    total
                ),
                min_ctx: self.kv_layout.seq_cap,
            }
            .into());
        }
        let blocks = blocks as usize;
        let buf = self
            .dev
            .alloc(blocks.saturating_mul(per as usize), "KV pool")?;
        let book = KvPool::external(&self.hp, KvType::F16, DEFAULT_BLOCK_TOKENS, blocks, per);
        self.pool = Some(DevicePool {
            buf,
            blocks: KvBlocks {
                block_tokens: DEFAULT_BLOCK_TOKENS,
                block_bytes: per as usize,
                blocks,
            },
            book: book.shared(),
        });
        Ok(())
    }

    /// Once per step (the first layer that has the caches): takes the blocks the step's
    /// sequences write (`kvs` in segment order), queues the block copies a copy-on-write asked
    /// for, and writes the step's block tables and batched-decode sequence table (one entry
    /// per sequence that decodes one token over a short context, [`batched_decode`], when
    /// there are at least two). The synchronous writes happen before any of this step's
    /// launches, and the previous step's readers finished before `embed_rows` returned.
    fn write_tables(&mut self, kvs: &mut [&mut KvCache]) -> Result<()> {
        if self.seq_table.is_some() {
            return Ok(());
        }
        if kvs.len() != self.segs.len() {
            return Err(bad(format!(
                "{} KV caches for {} sequences",
                kvs.len(),
                self.segs.len()
            )));
        }
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| bad("a step before any KV cache".into()))?;
        let mut tables = vec![0u32; self.segs.len() * self.table_len];
        for (i, (kv, &(_, n, pos))) in kvs.iter_mut().zip(&self.segs).enumerate() {
            if !Arc::ptr_eq(kv.pool(), &pool.book) {
                return Err(bad("a KV cache of another pool in a step".into()));
            }
            kv.reserve(pos + n)?;
            let ids = kv.blocks();
            if ids.len() > self.table_len || ids.len() * DEFAULT_BLOCK_TOKENS < pos + n {
                return Err(bad(format!(
                    "a block table of {} blocks for positions up to {}",
                    ids.len(),
                    pos + n
                )));
            }
            tables[i * self.table_len..i * self.table_len + ids.len()].copy_from_slice(ids);
        }
        let copies = lock(&pool.book).take_copies();
        let bb = pool.blocks.block_bytes;
        for (src, dst) in copies {
            let whole = View::of(&pool.buf);
            let (from, to) = (
                whole.slice(src as usize * bb, bb)?,
                whole.slice(dst as usize * bb, bb)?,
            );
            // One "plane" of one position holding the whole block.
            self.dev
                .kv_copy(&self.stream, &from, 1, &to, 1, 1, bb / 2, 1)?;
        }
        self.s.tables.write(0, &tables)?;
        let base = self.s.tables.device_ptr();
        let entries: Vec<[u64; 2]> = self
            .segs
            .iter()
            .enumerate()
            .filter(|(_, &(_, n, pos))| batched_decode(n, pos))
            .map(|(i, &(first, _, pos))| {
                seq_kv_entry(base + (i * self.table_len * 4) as u64, pos, first)
            })
            .collect();
        let count = if entries.len() >= 2 {
            self.s.seqs.write(0, &entries)?;
            entries.len()
        } else {
            0
        };
        self.seq_table = Some(count);
        Ok(())
    }

    /// The layer pass's context for `layer` over the step's rows (`with_kv`: the step's
    /// block tables are written, [`Self::write_tables`]).
    fn ctx(&mut self, layer: usize, with_kv: bool) -> Result<LayerCtx<'_, D>> {
        if self.n == 0 || self.segs.is_empty() {
            return Err(bad("layer before embed and segments".into()));
        }
        let tables = View::of(&self.s.tables);
        let tl = self.table_len * 4;
        let segs = self
            .segs
            .iter()
            .enumerate()
            .map(|(i, &(first, n, pos))| {
                Ok(Segment {
                    first,
                    n,
                    pos,
                    table: tables.slice(i * tl, tl)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let kv_pool = match (&self.pool, with_kv) {
            (Some(p), true) => Some(KvPoolView {
                buf: View::of(&p.buf),
                blocks: p.blocks,
            }),
            _ => None,
        };
        Ok(LayerCtx {
            dev: &*self.dev,
            stream: &self.stream,
            s: &self.s,
            gemm: Gemm {
                engine: Some(self.gemm.as_mut()),
                tile_rows_bytes: TILE_ROWS_BYTES,
                q8: self.q8,
                min_tokens: self.gemm_min_tokens,
            },
            hp: &self.hp,
            kv_layout: self.kv_layout,
            kv_pool,
            segs,
            seq_table: self.seq_table.unwrap_or(0),
            n: self.n,
            layer,
            freq_scale: self.freq_scale,
            rope_factors: self.rope_factors.as_ref().map(View::of),
            q8_of: None,
            pending: None,
            routes: &mut self.routes,
        })
    }
}

impl<D: KernelDevice> LayeredForward for GpuLayered<D> {
    type Device = D;
    type Error = GpuForwardError;

    /// Opens the vendor GEMM on its own thread while nothing runs (see `DeferredGemm`).
    fn idle(&mut self) {
        self.gemm.warm();
    }

    fn stream(&self) -> &D::Stream {
        &self.stream
    }

    fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn context_len(&self) -> usize {
        self.kv_layout.seq_cap
    }

    fn configure_kv(&mut self, bytes: Option<u64>) -> Result<SharedKvPool> {
        if let Some(p) = &self.pool {
            if lock(&p.book).allocator().used() > 0 {
                return Err(bad(
                    "the KV pool is reconfigured while sequences hold blocks".into(),
                ));
            }
        }
        self.pool = None;
        self.make_pool(bytes)?;
        self.kv_pool()
            .ok_or_else(|| bad("internal: no KV pool after making it".into()))
    }

    fn kv_pool(&self) -> Option<SharedKvPool> {
        self.pool.as_ref().map(|p| p.book.clone())
    }

    fn new_kv(&mut self) -> Result<KvCache> {
        if self.pool.is_none() {
            self.make_pool(None)?;
        }
        let pool = self
            .kv_pool()
            .ok_or_else(|| bad("internal: no KV pool".into()))?;
        Ok(KvCache::in_pool(pool, self.kv_layout.seq_cap))
    }

    fn max_sequences(&self) -> usize {
        self.max_seqs
    }

    fn embed_rows(&mut self, table: &DeviceTensor<'_>, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        self.n = 0;
        self.segs.clear();
        self.seq_table = None;
        if n == 0 {
            return Err(ModelError::EmptyPrompt.into());
        }
        if n > self.max_batch {
            return Err(GpuForwardError::Unsupported(format!(
                "{n} tokens in one step (the pipelined GPU pass takes at most {})",
                self.max_batch
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                token: t,
                vocab: self.n_vocab,
            }
            .into());
        }
        // The synchronous writes below must not race kernels of an abandoned step still
        // reading these buffers (a cancelled request stops between layers).
        self.stream.synchronize()?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.s.ids.write(0, &ids)?;
        let (tv, m) = mat(table, "token embeddings")?;
        self.dev.get_rows(
            &self.stream,
            &tv,
            m,
            &self.s.ids,
            n,
            &self.s.hidden,
            &self.s.status,
        )?;
        // The family's embedding scale (Gemma: sqrt(d)), as the CPU's `scale_embeddings`.
        let scale = self.hp.embed_scale;
        if scale != 1.0 {
            let h = View::of(&self.s.hidden).prefix(n * self.hp.n_embd * 4)?;
            self.dev
                .scale(&self.stream, &h, &h, scale, n * self.hp.n_embd)?;
        }
        self.n = n;
        Ok(())
    }

    fn set_segments(&mut self, parts: &[(usize, usize)]) -> Result<()> {
        let n = self.n;
        if n == 0 {
            return Err(bad("segments before embed".into()));
        }
        if parts.is_empty() || parts.len() > self.max_seqs {
            return Err(bad(format!(
                "{} sequences in one step (at most {})",
                parts.len(),
                self.max_seqs
            )));
        }
        let total: usize = parts.iter().map(|p| p.0).sum();
        if total != n || parts.iter().any(|p| p.0 == 0) {
            return Err(bad(format!(
                "segments of {:?} rows for {n} embedded tokens",
                parts.iter().map(|p| p.0).collect::<Vec<_>>()
            )));
        }
        let mut ps: Vec<i32> = Vec::with_capacity(n);
        let mut segs = Vec::with_capacity(parts.len());
        for &(rows, pos) in parts {
            if pos + rows > self.kv_layout.seq_cap {
                return Err(ModelError::ContextOverflow {
                    needed: pos + rows,
                    ctx: self.kv_layout.seq_cap,
                }
                .into());
            }
            segs.push((ps.len(), rows, pos));
            ps.extend((pos..pos + rows).map(|p| p as i32));
        }
        // Positions are read by the first layer's RoPE, queued after this synchronous write;
        // the previous step's readers finished before `embed_rows` returned.
        self.s.pos.write(0, &ps)?;
        self.segs = segs;
        self.seq_table = None;
        Ok(())
    }

    fn layer_batch(
        &mut self,
        layer: usize,
        w: &LayerTensors<'_>,
        kvs: &mut [&mut KvCache],
    ) -> Result<()> {
        self.write_tables(kvs)?;
        run_layer(&mut self.ctx(layer, true)?, w)
    }

    fn layer_routed(
        &mut self,
        layer: usize,
        w: &LayerTensors<'_>,
        kvs: &mut [&mut KvCache],
    ) -> Result<Vec<usize>> {
        self.write_tables(kvs)?;
        run_layer_routed(&mut self.ctx(layer, true)?, w)?;
        Ok(self.routes.experts())
    }

    fn expert(&mut self, layer: usize, e: usize, w: [&DeviceTensor<'_>; 3]) -> Result<()> {
        self.ctx(layer, false)?.expert(e, w)
    }

    fn layer_finish(&mut self, layer: usize) -> Result<()> {
        let mut cx = self.ctx(layer, false)?;
        cx.add(Act::Hidden, Act::Proj)?;
        cx.finish()
    }

    fn hidden_to_host(&mut self) -> Result<Vec<f32>> {
        if self.n == 0 {
            return Err(bad("hidden state before embed".into()));
        }
        self.stream.synchronize()?;
        Ok(self.s.hidden.to_vec::<f32>(self.n * self.hp.n_embd)?)
    }

    fn hidden_from_host(&mut self, rows: &[f32]) -> Result<()> {
        if self.n == 0 || rows.len() != self.n * self.hp.n_embd {
            return Err(bad(format!(
                "{} hidden values from the host for a step of {} rows of {}",
                rows.len(),
                self.n,
                self.hp.n_embd
            )));
        }
        // A synchronous copy: nothing queued may still read the old rows.
        self.stream.synchronize()?;
        self.s.hidden.write(0, rows)?;
        Ok(())
    }

    fn final_hidden(&mut self, norm: &DeviceTensor<'_>) -> Result<Vec<f32>> {
        let n = self.n;
        if n == 0 {
            return Err(bad("final hidden state before embed".into()));
        }
        let d = self.hp.n_embd;
        let nw = vec_f32(norm, d, "output_norm")?;
        let x = View::of(&self.s.hidden).prefix(n * d * 4)?;
        let xn = View::of(&self.s.xn).prefix(n * d * 4)?;
        self.dev
            .rmsnorm(&self.stream, &x, &nw, &xn, n, d, self.hp.rms_eps)?;
        self.stream.synchronize()?;
        self.n = 0;
        self.segs.clear();
        Ok(self.s.xn.to_vec::<f32>(n * d)?)
    }

    fn output(&mut self, norm: &DeviceTensor<'_>, head: &DeviceTensor<'_>) -> Result<Vec<f32>> {
        let last = self
            .n
            .checked_sub(1)
            .ok_or_else(|| bad("output before embed".into()))?;
        match self.output_rows(norm, head, &[last], &[false])?.pop() {
            Some(RowLogits::Full(l)) => Ok(l),
            _ => Err(bad("no logits".into())),
        }
    }

    fn output_rows(
        &mut self,
        norm: &DeviceTensor<'_>,
        head: &DeviceTensor<'_>,
        rows: &[usize],
        greedy: &[bool],
    ) -> Result<Vec<RowLogits>> {
        let n = self.n;
        if n == 0 {
            return Err(bad("output before embed".into()));
        }
        if rows.len() > self.max_seqs || rows.iter().any(|&r| r >= n) || greedy.len() != rows.len()
        {
            return Err(bad(format!(
                "logits of rows {rows:?} of a {n}-row step (at most {} rows)",
                self.max_seqs
            )));
        }
        let d = self.hp.n_embd;
        let v = self.n_vocab;
        let nw = vec_f32(norm, d, "output_norm")?;
        let (hv, hm) = mat(head, "output")?;
        if hm.ncols != d || hm.nrows != v {
            return Err(bad(format!(
                "output head {} x {}, expected {v} x {d}",
                hm.nrows, hm.ncols
            )));
        }
        // The wanted rows, normalised into consecutive rows of `xn`, then the head once over
        // all of them (its weights read once per 8 rows).
        for (i, &r) in rows.iter().enumerate() {
            let x = View::of(&self.s.hidden).slice(r * d * 4, d * 4)?;
            let xn = View::of(&self.s.xn).slice(i * d * 4, d * 4)?;
            self.dev
                .rmsnorm(&self.stream, &x, &nw, &xn, 1, d, self.hp.rms_eps)?;
        }
        let k = rows.len();
        if k > 0 {
            let xn = View::of(&self.s.xn).prefix(k * d * 4)?;
            let lg = View::of(&self.s.logits).prefix(k * v * 4)?;
            let mut g = Gemm {
                engine: None,
                tile_rows_bytes: TILE_ROWS_BYTES,
                q8: self.q8,
                min_tokens: self.gemm_min_tokens,
            };
            let mut quantized = false;
            linear_q(
                &*self.dev,
                &self.stream,
                &self.s,
                &mut g,
                (hv, hm),
                xn,
                lg,
                k,
                &mut quantized,
            )?;
        }
        // Greedy rows' tokens chosen here: 4 bytes back instead of the row's logits (a
        // 128k vocabulary's 512 KB a sequence a step).
        let tokens = if k > 0 && greedy.contains(&true) {
            let lg = View::of(&self.s.logits).prefix(k * v * 4)?;
            self.dev.argmax(&self.stream, &lg, v, k, &self.s.tok)?;
            self.stream.synchronize()?;
            self.s.tok.to_vec::<i32>(k)?
        } else {
            self.stream.synchronize()?;
            Vec::new()
        };
        self.n = 0;
        self.segs.clear();
        let mut out = Vec::with_capacity(k);
        for (i, &g) in greedy.iter().enumerate() {
            out.push(match tokens.get(i) {
                Some(&t) if g => RowLogits::Argmax(
                    u32::try_from(t).map_err(|_| bad(format!("device argmax gave {t}")))?,
                ),
                _ => {
                    let mut row = vec![0f32; v];
                    self.s.logits.read(i * v * 4, &mut row)?;
                    RowLogits::Full(row)
                }
            });
        }
        Ok(out)
    }
}
