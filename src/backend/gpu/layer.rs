//! One transformer layer on the device, for any [`KernelDevice`]: [`super::GpuLayered`]
//! (weights in regions the pipeline's uploader filled) describes a layer as device views and
//! calls [`run_layer`].

use super::gemm::{GemmF16, GemmF16Nt};
use super::ops::{AttnParams, GpuOps, KvLayout, QMatrix, RopeParams};
use super::{KernelDevice, Result, View};
use crate::model::HParams;

/// Batches of at least this many tokens run their matrix products through a GEMM (dequantized
/// f16 weight tiles); shorter ones (a decode step of up to 16 sequences, short prompts) run the
/// batched mmvq, which reads the quantized weights once per 8 tokens.
pub const GEMM_MIN_TOKENS: usize = 17;

/// The activations of one step (`B` is the vendor's device buffer), sized for the pass's
/// largest batch `b`: `[b, width]` f32 unless stated.
pub struct Scratch<B> {
    pub hidden: B,
    pub xn: B,
    pub q: B,
    pub k: B,
    pub v: B,
    pub attn: B,
    pub proj: B,
    pub gate: B,
    pub up: B,
    /// `[n_vocab]` f32.
    pub logits: B,
    /// Token ids and positions of the step, `[b]` i32.
    pub ids: B,
    pub pos: B,
    /// One i32: get_rows' out-of-range flag.
    pub status: B,
    /// One i32: the device sampler's token.
    pub tok: B,
    /// f16 activations and one f16 weight tile for the GEMM path.
    pub x16: B,
    pub w16: B,
}

/// The GEMM path's state: the GEMM (vendor library or the portable kernel; `None`: mmvq per
/// token for every batch) and the f16 weight-tile size.
pub struct Gemm<'a, D: KernelDevice> {
    pub engine: Option<&'a mut dyn GemmF16<D>>,
    pub tile_rows_bytes: usize,
}

/// `y[n, rows] = x[n, cols] W^T`: mmvq per token for short batches, the GEMM otherwise.
#[allow(clippy::too_many_arguments)] // a GEMM's operands; a struct would only rename them
pub fn linear<D: KernelDevice>(
    dev: &D,
    st: &D::Stream,
    s: &Scratch<D::Buf>,
    g: &mut Gemm<D>,
    w: View<'_>,
    m: QMatrix,
    x: View<'_>,
    y: View<'_>,
    n: usize,
) -> Result<()> {
    if n >= GEMM_MIN_TOKENS {
        if let Some(engine) = g.engine.as_deref_mut() {
            let kv = KvLayout {
                n_kv_heads: 1,
                head_dim: m.ncols,
                seq_cap: n,
            };
            // kv_store with one "head" is a plain f32 -> f16 conversion of [n, cols].
            dev.kv_store(st, &x, &s.x16, kv, n, 0)?;
            let tile = (g.tile_rows_bytes / (m.ncols * 2)).max(1).min(m.nrows);
            let mut r0 = 0;
            while r0 < m.nrows {
                let rows = tile.min(m.nrows - r0);
                dev.dequantize_f16(st, &w, m, r0, rows, &s.w16)?;
                let yv = y.slice(r0 * 4, y.len() - r0 * 4)?;
                let op = GemmF16Nt {
                    w16: &s.w16,
                    rows,
                    k: m.ncols,
                    x16: &s.x16,
                    n,
                    y: &yv,
                    ldy: m.nrows,
                };
                engine.gemm_f16_nt(dev, st, &op)?;
                r0 += rows;
            }
            return Ok(());
        }
    }
    dev.mmvq_n(st, &w, m, &x, &y, n)?;
    Ok(())
}

/// One layer's weights as device views: q, k, v, o, gate, up, down; f32 norms; f32 biases;
/// f32 per-head query/key norms (`[head_dim]`, Qwen3).
pub struct LayerViews<'a> {
    pub mats: [(View<'a>, QMatrix); 7],
    pub attn_norm: View<'a>,
    pub ffn_norm: View<'a>,
    pub bias: [Option<View<'a>>; 3],
    pub qk_norm: [Option<View<'a>>; 2],
}

/// One sequence's rows in a step: rows `first .. first + n` of the scratch buffers are its
/// tokens at positions `pos ..`; `kv` is its whole KV cache (`[layer][k|v]` blocks).
pub struct Segment<'a> {
    pub first: usize,
    pub n: usize,
    pub pos: usize,
    pub kv: View<'a>,
}

/// What a layer pass borrows from its owner.
pub struct LayerCtx<'a, D: KernelDevice> {
    pub dev: &'a D,
    pub stream: &'a D::Stream,
    pub s: &'a Scratch<D::Buf>,
    pub gemm: Gemm<'a, D>,
    pub hp: &'a HParams,
    pub kv_layout: KvLayout,
    /// The sequences of the step, in row order; their rows add up to `n`.
    pub segs: &'a [Segment<'a>],
    /// Rows of the step (every sequence's tokens).
    pub n: usize,
    pub freq_scale: f32,
    /// RoPE frequency divisors (`[n_rot / 2]` f32), if the model has them.
    pub rope_factors: Option<View<'a>>,
}

/// The first `floats` f32 values of `b`.
fn f32s<B: crate::backend::DeviceBuffer>(b: &B, floats: usize) -> Result<View<'_>> {
    Ok(View::of(b).prefix(floats * 4)?)
}

/// Queues layer `l` on `cx.stream`: `hidden[n, d]` in the scratch buffers is updated in place;
/// the K/V of positions `pos..pos + n` land in the cache.
pub fn run_layer<D: KernelDevice>(
    cx: &mut LayerCtx<D>,
    l: usize,
    w: &LayerViews<'_>,
) -> Result<()> {
    let (dev, st, hp, n) = (cx.dev, cx.stream, cx.hp, cx.n);
    let (d, qd, kd, vd, ff) = (hp.n_embd, hp.q_dim(), hp.k_dim(), hp.v_dim(), hp.n_ff);
    let s = cx.s;
    let v = f32s::<D::Buf>;
    let (hidden, xn, q, k, vv, attn, proj, gate, up) = (
        v(&s.hidden, n * d)?,
        v(&s.xn, n * d)?,
        v(&s.q, n * qd)?,
        v(&s.k, n * kd)?,
        v(&s.v, n * vd)?,
        v(&s.attn, n * qd)?,
        v(&s.proj, n * d)?,
        v(&s.gate, n * ff)?,
        v(&s.up, n * ff)?,
    );
    dev.rmsnorm(st, &hidden, &w.attn_norm, &xn, n, d, hp.rms_eps)?;
    for (i, out) in [(0, q), (1, k), (2, vv)] {
        let (wv, m) = w.mats[i];
        linear(dev, st, s, &mut cx.gemm, wv, m, xn, out, n)?;
        if let Some(bias) = w.bias[i] {
            let width = m.nrows;
            for t in 0..n {
                let o = out.slice(t * width * 4, width * 4)?;
                dev.add(st, &o, &bias, &o, width)?;
            }
        }
    }
    // Per-head RMS norm of queries and keys (Qwen3): every head's row of head_dim values is one
    // row of the norm kernel (in place).
    for (norm, x, heads) in [
        (w.qk_norm[0], q, hp.n_head),
        (w.qk_norm[1], k, hp.n_head_kv),
    ] {
        if let Some(nw) = norm {
            dev.rmsnorm(st, &x, &nw, &x, n * heads, hp.head_dim, hp.rms_eps)?;
        }
    }
    let rp = |heads| RopeParams {
        n_tokens: n,
        n_heads: heads,
        head_dim: hp.head_dim,
        n_rot: hp.n_rot,
        freq_base: hp.rope_freq_base,
        freq_scale: cx.freq_scale,
        neox: hp.arch.rope_layout() == crate::model::RopeLayout::NeoX,
    };
    let rf = cx
        .rope_factors
        .as_ref()
        .map(|v| v as &dyn crate::backend::DeviceBuffer);
    dev.rope(st, &q, &q, &s.pos, rf, rp(hp.n_head))?;
    dev.rope(st, &k, &k, &s.pos, rf, rp(hp.n_head_kv))?;
    // Each sequence stores its keys and values in its own cache and attends over it; the
    // projections above and below run once over every row of the step.
    let kvb = cx.kv_layout.bytes();
    for sg in cx.segs {
        let kc = sg.kv.slice((2 * l) * kvb, kvb)?;
        let vc = sg.kv.slice((2 * l + 1) * kvb, kvb)?;
        let ks = k.slice(sg.first * kd * 4, sg.n * kd * 4)?;
        let vs = vv.slice(sg.first * vd * 4, sg.n * vd * 4)?;
        dev.kv_store(st, &ks, &kc, cx.kv_layout, sg.n, sg.pos)?;
        dev.kv_store(st, &vs, &vc, cx.kv_layout, sg.n, sg.pos)?;
        let ap = AttnParams {
            n_tokens: sg.n,
            n_heads: hp.n_head,
            kv: cx.kv_layout,
            pos0: sg.pos,
            scale: 1.0 / (hp.head_dim as f32).sqrt(),
            window: hp.local_window(l).unwrap_or(0),
        };
        let qs = q.slice(sg.first * qd * 4, sg.n * qd * 4)?;
        let os = attn.slice(sg.first * qd * 4, sg.n * qd * 4)?;
        dev.attention(st, &qs, &kc, &vc, &os, ap)?;
    }
    let (wo, mo) = w.mats[3];
    linear(dev, st, s, &mut cx.gemm, wo, mo, attn, proj, n)?;
    dev.add(st, &hidden, &proj, &hidden, n * d)?;
    dev.rmsnorm(st, &hidden, &w.ffn_norm, &xn, n, d, hp.rms_eps)?;
    let (wg, mg) = w.mats[4];
    linear(dev, st, s, &mut cx.gemm, wg, mg, xn, gate, n)?;
    let (wu, mu) = w.mats[5];
    linear(dev, st, s, &mut cx.gemm, wu, mu, xn, up, n)?;
    dev.swiglu(st, &gate, &up, &gate, n * ff)?;
    let (wd, md) = w.mats[6];
    linear(dev, st, s, &mut cx.gemm, wd, md, gate, proj, n)?;
    dev.add(st, &hidden, &proj, &hidden, n * d)?;
    Ok(())
}
