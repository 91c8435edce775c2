//! One transformer layer on the device, for any [`KernelDevice`]: the device's ops of the
//! model's one block ([`crate::model::run_block`]); [`super::GpuLayered`] hands [`run_layer`]
//! the layer's device tensors (in regions the pipeline's uploader filled).

use std::fmt::Display;

use super::gemm::{GemmF16, GemmF16Nt};
use super::ops::{AttnParams, GpuOps, KvBlocks, KvLayout, KvPages, QMatrix, RopeParams};
use super::{GpuForwardError, KernelDevice, Result, View};
use crate::backend::error::BackendError;
use crate::backend::{BufferIo, DeviceBuffer, DeviceStream, DeviceTensor};
use crate::model::{
    moe::Routes, run_block, run_block_routed, tensor_name, Act, Arch, BlockOps, FfnActivation,
    HParams, LayerSet, Role, RopeLayout,
};
use crate::quant::GgmlType;

/// Batches of at least this many tokens run their matrix products through a GEMM (dequantized
/// f16 weight tiles) on a device with int8 tensor cores; shorter ones (a decode step of up to 32
/// sequences, short prompts) run the batched matrix-vector products, which read the quantized
/// weights once per launch of up to 32 vectors (packed tensor-core tiles). Measured, H100, 8B
/// Q4_0 (docs/PERFORMANCE.md, fifteenth session): 24 / 32 sequences decode at 1,872 / 2,358
/// tok/s on one packed launch against 1,119 / 1,613 on the GEMM (the default was 17 before).
pub const GEMM_MIN_TOKENS: usize = 33;
/// [`GEMM_MIN_TOKENS`] on a device without int8 tensor cores, whose batched products read the
/// weights once per 8 vectors (the dp4a `_n` forms): past 16 rows the GEMM.
pub const GEMM_MIN_TOKENS_DP4A: usize = 17;

/// [`GEMM_MIN_TOKENS`] (`int8_mma`: the device has int8 tensor cores, else
/// [`GEMM_MIN_TOKENS_DP4A`]), or `ROCMFORGE_GPU_GEMM_ROWS` (2 to 65,536) for A/B runs of
/// batched decode (e.g. 17: decode steps of 17 to 32 sequences on the GEMM; larger than 33:
/// prefill on the products too).
pub fn gemm_min_tokens(int8_mma: bool) -> usize {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let knob = *ROWS.get_or_init(|| {
        std::env::var("ROCMFORGE_GPU_GEMM_ROWS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (2..=65_536).contains(n))
    });
    knob.unwrap_or(if int8_mma {
        GEMM_MIN_TOKENS
    } else {
        GEMM_MIN_TOKENS_DP4A
    })
}

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
    /// `[seqs]` i32: the greedy tokens of a step's rows (`LayeredForward::output_rows`).
    pub tok: B,
    /// f16 activations and one f16 weight tile for the GEMM path.
    pub x16: B,
    pub w16: B,
    /// The step's input of a matrix-vector product quantized to 8 bits (`q8a_bytes`), and at
    /// its end the room a tensor-core batch packs it into (`ops::mma_pack_bytes`).
    pub xq: B,
    /// The split decode attention's partial sums (`attn_part_bytes`).
    pub attn_part: B,
    /// A batched decode step's sequence table (`[max_seqs]` entries of
    /// `ops::SEQ_KV_ENTRY_BYTES`; `ops::seq_kv_entry`).
    pub seqs: B,
    /// The step's block tables: `[max_seqs, blocks of a full context]` u32, sequence `i`'s
    /// at row `i` (the segments' order).
    pub tables: B,
}

/// Whether a sequence's part of a step (`n` rows at positions `pos ..`) runs in the step's
/// batched decode launches (one K/V store and one attention launch for all such sequences):
/// one token over a context the one-block kernel takes (longer ones split across blocks).
pub fn batched_decode(n: usize, pos: usize) -> bool {
    n == 1 && pos < super::ops::ATTN_SPLIT_CHUNK
}

/// The GEMM path's state: the GEMM (vendor library or the portable kernel; `None`: mmvq per
/// token for every batch), the f16 weight-tile size, and whether short batches quantize their
/// activations to 8 bits for the matrix-vector products (`q8`; `false`: f32 activations, the
/// exact precision).
pub struct Gemm<'a, D: KernelDevice> {
    pub engine: Option<&'a mut dyn GemmF16<D>>,
    pub tile_rows_bytes: usize,
    pub q8: bool,
    /// Steps of at least this many rows take the GEMM ([`gemm_min_tokens`]).
    pub min_tokens: usize,
}

impl<D: KernelDevice> Gemm<'_, D> {
    /// Whether [`linear`] runs `m` over `n` rows as the 8-bit matrix-vector product.
    fn q8_for(&self, m: QMatrix, n: usize) -> bool {
        self.q8
            && (n < self.min_tokens || self.engine.is_none())
            && crate::backend::kernels::q8a_capable(m.qtype)
            && m.ncols % 32 == 0
    }
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
    let mut quantized = false;
    linear_q(dev, st, s, g, (w, m), x, y, n, &mut quantized)
}

/// [`linear`] for products sharing one input `x`: `quantized` says whether `s.xq` holds `x`
/// quantized already (set by the first 8-bit product, so Q/K/V or gate/up quantize it once).
#[allow(clippy::too_many_arguments)] // as `linear`, plus the shared-input flag
pub fn linear_q<D: KernelDevice>(
    dev: &D,
    st: &D::Stream,
    s: &Scratch<D::Buf>,
    g: &mut Gemm<D>,
    (w, m): (View<'_>, QMatrix),
    x: View<'_>,
    y: View<'_>,
    n: usize,
    quantized: &mut bool,
) -> Result<()> {
    if g.q8_for(m, n) {
        if !*quantized {
            dev.quantize_q8a(st, &x, &s.xq, n, m.ncols)?;
            *quantized = true;
        }
        dev.mmvq_q8(st, &w, m, &s.xq, &y, n)?;
        return Ok(());
    }
    if n >= g.min_tokens {
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

/// One sequence's rows in a step: rows `first .. first + n` of the scratch buffers are its
/// tokens at positions `pos ..`; `table` is its block table in the KV pool (u32 ids).
pub struct Segment<'a> {
    pub first: usize,
    pub n: usize,
    pub pos: usize,
    pub table: View<'a>,
}

/// The sequences' KV pool as a layer pass sees it: the device buffer of every block and its
/// geometry (`ops::KvBlocks`: block `b`'s layer `l` K plane at `b * block_bytes + 2 l *
/// plane`, its V plane one plane further).
#[derive(Clone, Copy)]
pub struct KvPoolView<'a> {
    pub buf: View<'a>,
    pub blocks: KvBlocks,
}

impl<'a> KvPoolView<'a> {
    /// Layer `l`'s K and V planes in block 0, each reaching the pool's end.
    pub fn planes(&self, l: usize, kv: KvLayout) -> Result<(View<'a>, View<'a>)> {
        let plane = kv.plane_bytes(self.blocks.block_tokens);
        let len = self.buf.len();
        let at = |off: usize| self.buf.slice(off, len.saturating_sub(off));
        Ok((at(2 * l * plane)?, at((2 * l + 1) * plane)?))
    }
}

/// What a layer pass borrows from its owner; it runs [`run_block`]'s ops on the device
/// ([`run_layer`]).
pub struct LayerCtx<'a, D: KernelDevice> {
    pub dev: &'a D,
    pub stream: &'a D::Stream,
    pub s: &'a Scratch<D::Buf>,
    pub gemm: Gemm<'a, D>,
    pub hp: &'a HParams,
    pub kv_layout: KvLayout,
    /// The KV pool the segments' tables point into (`None` before one exists: a step without
    /// caches, e.g. the experts of a routed layer).
    pub kv_pool: Option<KvPoolView<'a>>,
    /// The sequences of the step, in row order; their rows add up to `n`.
    pub segs: Vec<Segment<'a>>,
    /// Entries of the step's batched-decode table in `s.seqs` (the segments for which
    /// [`batched_decode`] holds, in order; written by the owner), or 0: every sequence's
    /// attention runs on its own.
    pub seq_table: usize,
    /// Rows of the step (every sequence's tokens).
    pub n: usize,
    /// The layer being run (its KV block, its attention window).
    pub layer: usize,
    pub freq_scale: f32,
    /// RoPE frequency divisors (`[n_rot / 2]` f32), if the model has them.
    pub rope_factors: Option<View<'a>>,
    /// The activation `s.xq` holds quantized (a fused norm or gated activation wrote it).
    pub q8_of: Option<Act>,
    /// A product into `Proj` not launched yet: if the next op adds `Proj` to the residual it
    /// runs with the add in its epilogue (one launch, the same bits), else as written.
    pub pending: Option<(View<'a>, QMatrix)>,
    /// The last MoE router's choice ([`BlockOps::route`]), kept for the experts that follow.
    pub routes: &'a mut Routes,
}

/// `g = act(g) * u` over `n` f32 on the device: the family's gated activation.
fn gated<D: KernelDevice>(
    dev: &D,
    st: &D::Stream,
    act: FfnActivation,
    g: &View<'_>,
    u: &View<'_>,
    n: usize,
) -> Result<()> {
    match act {
        FfnActivation::Silu => dev.swiglu(st, g, u, g, n)?,
        FfnActivation::GeluTanh => dev.geglu_tanh(st, g, u, g, n)?,
    }
    Ok(())
}

/// The first `floats` f32 values of `b`.
fn f32s<B: crate::backend::DeviceBuffer>(b: &B, floats: usize) -> Result<View<'_>> {
    Ok(View::of(b).prefix(floats * 4)?)
}

pub(super) fn bad(what: String) -> GpuForwardError {
    GpuForwardError::Backend(BackendError::InvalidArgument {
        op: "GpuLayered",
        what,
    })
}

/// A quantized matrix of a tensor; the type must have a kernel.
pub(super) fn mat<'a>(
    t: &DeviceTensor<'a>,
    what: &(impl Display + ?Sized),
) -> Result<(View<'a>, QMatrix)> {
    if crate::backend::kernels::qtype_suffix(t.ty).is_none() {
        return Err(GpuForwardError::Unsupported(format!(
            "weight type {} ({what})",
            t.ty
        )));
    }
    let need =
        t.ty.row_bytes(t.cols as u64)
            .and_then(|rb| (rb as usize).checked_mul(t.rows));
    if need.is_none_or(|need| need > t.bytes().len()) {
        return Err(bad(format!(
            "{what}: {} x {} {} needs {need:?} B, the tensor has {}",
            t.rows,
            t.cols,
            t.ty,
            t.bytes().len()
        )));
    }
    Ok((
        t.bytes(),
        QMatrix {
            qtype: t.ty,
            nrows: t.rows,
            ncols: t.cols,
        },
    ))
}

/// A vector of `n` F32 values (norms, biases).
pub(super) fn vec_f32<'a>(
    t: &DeviceTensor<'a>,
    n: usize,
    what: &(impl Display + ?Sized),
) -> Result<View<'a>> {
    if t.ty != GgmlType::F32 || t.rows * t.cols != n || t.bytes().len() < n * 4 {
        return Err(GpuForwardError::Unsupported(format!(
            "{what} must be {n} F32 values (got {} x {} {})",
            t.rows, t.cols, t.ty
        )));
    }
    Ok(t.bytes().prefix(n * 4)?)
}

/// Queues layer `cx.layer` on `cx.stream`: `hidden[n, d]` in the scratch buffers is updated in
/// place; the K/V of each segment's positions land in its cache. The steps are the model's
/// [`run_block`], the same as on the CPU.
pub fn run_layer<'a, D: KernelDevice>(
    cx: &mut LayerCtx<'a, D>,
    w: &LayerSet<DeviceTensor<'a>>,
) -> Result<()> {
    let hp = cx.hp;
    run_block(cx, hp, w)?;
    cx.flush()
}

/// [`run_layer`] up to the experts (a layer whose experts run from units of their own): the
/// routing is left in `cx.routes`.
pub fn run_layer_routed<'a, D: KernelDevice>(
    cx: &mut LayerCtx<'a, D>,
    w: &LayerSet<DeviceTensor<'a>>,
) -> Result<()> {
    run_block_routed(cx, w)?;
    cx.flush()
}

impl<D: KernelDevice> LayerCtx<'_, D> {
    /// Launches what is still pending (a product waiting to fuse with the next op).
    pub fn finish(&mut self) -> Result<()> {
        self.flush()
    }
}

impl<'a, D: KernelDevice> LayerCtx<'a, D> {
    /// Expert `e` (its gate, up and down matrices) on the tokens [`Self::route`] sent it, each
    /// token's result added to its row of `Proj` with the token's weight. Per token
    /// matrix-vector products: correct, not yet fast.
    pub fn expert(&mut self, e: usize, [g, u, dn]: [&DeviceTensor<'a>; 3]) -> Result<()> {
        let mats = [
            mat(g, &self.name(Role::Gate))?,
            mat(u, &self.name(Role::Up))?,
            mat(dn, &self.name(Role::Down))?,
        ];
        self.expert_mats(e, mats)
    }

    fn expert_mats(&mut self, e: usize, mats: [(View<'a>, QMatrix); 3]) -> Result<()> {
        let [(gv, gm), (uv, um), (dv, dm)] = mats;
        let (d, fe) = (self.hp.n_embd, gm.nrows);
        if um.nrows != fe || dm.nrows != d || gm.ncols != d || dm.ncols != fe {
            return Err(bad(format!(
                "expert {e} of layer {}: gate {}x{}, up {}x{}, down {}x{} for width {d}",
                self.layer, gm.nrows, gm.ncols, um.nrows, um.ncols, dm.nrows, dm.ncols
            )));
        }
        let (xn, proj, attn) = (
            self.act(Act::Xn)?,
            self.act(Act::Proj)?,
            self.act(Act::Attn)?,
        );
        let (g, u) = (
            self.act(Act::Gate)?.prefix(fe * 4)?,
            self.act(Act::Up)?.prefix(fe * 4)?,
        );
        let y = attn.prefix(d * 4)?;
        let (dev, st) = (self.dev, self.stream);
        let act = self.hp.arch.ffn_activation();
        let (mut tokens, mut weights) = (Vec::new(), Vec::new());
        self.routes.tokens_of(e, &mut tokens, &mut weights);
        for (&i, &wt) in tokens.iter().zip(&weights) {
            if i >= self.n {
                return Err(bad(format!("routed token {i} of a step of {}", self.n)));
            }
            let x = xn.slice(i * d * 4, d * 4)?;
            let out = proj.slice(i * d * 4, d * 4)?;
            dev.mmvq_n(st, &gv, gm, &x, &g, 1)?;
            dev.mmvq_n(st, &uv, um, &x, &u, 1)?;
            gated(dev, st, act, &g, &u, fe)?;
            dev.mmvq_n(st, &dv, dm, &g, &y, 1)?;
            dev.axpy(st, &y, &out, wt, d)?;
        }
        Ok(())
    }

    /// Qwen2-MoE's shared expert over every row, added to `Proj` scaled per token by
    /// `sigmoid(x . gate_inp)`: `[gate_inp, gate, up, down]`.
    fn shared_expert(
        &mut self,
        n: usize,
        [gi, sg, su, sd]: [&DeviceTensor<'a>; 4],
        act: FfnActivation,
    ) -> Result<()> {
        let d = self.hp.n_embd;
        let fs = sg.rows;
        if fs > self.hp.n_ff {
            return Err(GpuForwardError::Unsupported(format!(
                "a shared expert of width {fs} beside an FFN of {}",
                self.hp.n_ff
            )));
        }
        let (xn, proj, attn, q) = (
            self.act(Act::Xn)?,
            self.act(Act::Proj)?,
            self.act(Act::Attn)?,
            self.act(Act::Q)?,
        );
        let (g, u) = (
            self.act(Act::Gate)?.prefix(n * fs * 4)?,
            self.act(Act::Up)?.prefix(n * fs * 4)?,
        );
        let tmp = attn.prefix(n * d * 4)?;
        for (t, role, out) in [(sg, Role::ShexpGate, g), (su, Role::ShexpUp, u)] {
            let (wv, m) = mat(t, &self.name(role))?;
            linear(
                self.dev,
                self.stream,
                self.s,
                &mut self.gemm,
                wv,
                m,
                xn,
                out,
                n,
            )?;
        }
        gated(self.dev, self.stream, act, &g, &u, n * fs)?;
        let (dv, dm) = mat(sd, &self.name(Role::ShexpDown))?;
        linear(
            self.dev,
            self.stream,
            self.s,
            &mut self.gemm,
            dv,
            dm,
            g,
            tmp,
            n,
        )?;
        // One gate logit per token, read back for the sigmoid.
        let (gv, gm) = mat(gi, &self.name(Role::ShexpGateInp))?;
        let logits = q.prefix(n * 4)?;
        self.dev.mmvq_n(self.stream, &gv, gm, &xn, &logits, n)?;
        self.stream.synchronize()?;
        let gates = self.s.q.to_vec::<f32>(n)?;
        for (i, &z) in gates.iter().enumerate() {
            let y = tmp.slice(i * d * 4, d * 4)?;
            let out = proj.slice(i * d * 4, d * 4)?;
            self.dev
                .axpy(self.stream, &y, &out, 1.0 / (1.0 + (-z).exp()), d)?;
        }
        Ok(())
    }

    /// Whether this step's products run on 8-bit activations (decode, short batches).
    fn q8_step(&self) -> bool {
        self.gemm.q8 && self.n < self.gemm.min_tokens
    }

    /// Launches the deferred product into `Proj`, if any (every op but the residual add that
    /// would absorb it calls this first).
    fn flush(&mut self) -> Result<()> {
        if let Some((w, m)) = self.pending.take() {
            let y = self.act(Act::Proj)?;
            self.dev
                .mmvq_q8_into(self.stream, &w, m, &self.s.xq, &y, self.n, false)?;
        }
        Ok(())
    }

    /// Before an op that writes `a`: the deferred product runs, and `s.xq` no longer holds `a`.
    fn before_write(&mut self, a: Act) -> Result<()> {
        self.flush()?;
        if self.q8_of == Some(a) {
            self.q8_of = None;
        }
        Ok(())
    }

    /// The step's rows of activation `a`.
    fn act(&self, a: Act) -> Result<View<'a>> {
        let s = self.s;
        let b = match a {
            Act::Hidden => &s.hidden,
            Act::Xn => &s.xn,
            Act::Q => &s.q,
            Act::K => &s.k,
            Act::V => &s.v,
            Act::Attn => &s.attn,
            Act::Proj => &s.proj,
            Act::Gate => &s.gate,
            Act::Up => &s.up,
        };
        f32s(b, self.n * a.width(self.hp))
    }

    /// Role `role` of layer `self.layer`, for errors.
    fn name(&self, role: Role) -> String {
        tensor_name(role.kind(), Some(self.layer))
    }
}

impl<'a, D: KernelDevice> BlockOps for LayerCtx<'a, D> {
    type W = DeviceTensor<'a>;
    type Error = GpuForwardError;

    fn norm(&mut self, x: Act, w: &DeviceTensor<'a>, role: Role, out: Act) -> Result<()> {
        self.before_write(out)?;
        let width = x.width(self.hp);
        let nw = vec_f32(w, width, &self.name(role))?;
        let (xv, ov) = (self.act(x)?, self.act(out)?);
        let eps = self.hp.rms_eps;
        if out == Act::Xn && self.q8_step() && width % 32 == 0 {
            // The products' input: normalised and quantized in one launch.
            self.dev
                .rmsnorm_q8a(self.stream, &xv, &nw, &ov, &self.s.xq, self.n, width, eps)?;
            self.q8_of = Some(out);
        } else {
            self.dev
                .rmsnorm(self.stream, &xv, &nw, &ov, self.n, width, eps)?;
        }
        Ok(())
    }

    fn head_norm(&mut self, x: Act, w: &DeviceTensor<'a>, role: Role) -> Result<()> {
        self.before_write(x)?;
        let hp = self.hp;
        let nw = vec_f32(w, hp.head_dim, &self.name(role))?;
        let heads = x.width(hp) / hp.head_dim.max(1);
        let xv = self.act(x)?;
        // Every head's row of head_dim values is one row of the norm kernel (in place).
        self.dev.rmsnorm(
            self.stream,
            &xv,
            &nw,
            &xv,
            self.n * heads,
            hp.head_dim,
            hp.rms_eps,
        )?;
        Ok(())
    }

    fn linear(&mut self, x: Act, outs: &[(&DeviceTensor<'a>, Role, Act)]) -> Result<()> {
        self.flush()?;
        let xv = self.act(x)?;
        // The outputs share the input: it is quantized (8-bit path) once for all of them, or
        // was already by the op that wrote it.
        let mut quantized = self.q8_of == Some(x);
        if let [(w, role, Act::Proj)] = outs {
            let (wv, m) = mat(w, &self.name(*role))?;
            if self.gemm.q8_for(m, self.n) {
                if !quantized {
                    self.dev
                        .quantize_q8a(self.stream, &xv, &self.s.xq, self.n, m.ncols)?;
                }
                self.q8_of = Some(x);
                // Launched by the next op: with the residual add if that is the next op.
                self.pending = Some((wv, m));
                return Ok(());
            }
        }
        // Several products of one type and width (Q/K/V, gate/up) on the 8-bit path: one launch.
        if outs.len() > 1 {
            let mats = outs
                .iter()
                .map(|(w, role, out)| Ok((mat(w, &self.name(*role))?, self.act(*out)?)))
                .collect::<Result<Vec<_>>>()?;
            let ((_, m0), _) = mats[0];
            let one_launch = mats.len() <= 3
                && outs.iter().all(|(_, _, out)| *out != x)
                && mats.iter().all(|((_, m), _)| {
                    self.gemm.q8_for(*m, self.n) && (m.qtype, m.ncols) == (m0.qtype, m0.ncols)
                });
            if one_launch {
                if !quantized {
                    self.dev
                        .quantize_q8a(self.stream, &xv, &self.s.xq, self.n, m0.ncols)?;
                }
                self.q8_of = Some(x);
                let args: Vec<(&dyn DeviceBuffer, QMatrix, &dyn DeviceBuffer)> = mats
                    .iter()
                    .map(|((w, m), y)| (w as &dyn DeviceBuffer, *m, y as &dyn DeviceBuffer))
                    .collect();
                self.dev
                    .mmvq_q8_multi(self.stream, &args, &self.s.xq, self.n, false)?;
                return Ok(());
            }
        }
        for (w, role, out) in outs {
            if self.q8_of == Some(*out) {
                self.q8_of = None;
            }
            let wm = mat(w, &self.name(*role))?;
            let yv = self.act(*out)?;
            linear_q(
                self.dev,
                self.stream,
                self.s,
                &mut self.gemm,
                wm,
                xv,
                yv,
                self.n,
                &mut quantized,
            )?;
            if quantized {
                self.q8_of = Some(x);
            }
        }
        Ok(())
    }

    fn add_bias(&mut self, x: Act, b: &DeviceTensor<'a>, role: Role) -> Result<()> {
        self.before_write(x)?;
        let width = x.width(self.hp);
        let bias = vec_f32(b, width, &self.name(role))?;
        let xv = self.act(x)?;
        for t in 0..self.n {
            let o = xv.slice(t * width * 4, width * 4)?;
            self.dev.add(self.stream, &o, &bias, &o, width)?;
        }
        Ok(())
    }

    fn rope(&mut self) -> Result<()> {
        self.before_write(Act::Q)?;
        self.before_write(Act::K)?;
        let hp = self.hp;
        // Gemma 3's sliding-window layers rotate with their own base, unscaled and without
        // frequency factors (as the CPU's `Model::rope_of`); every other layer with the model's.
        let local = match (hp.arch, hp.local_attention, hp.local_window(self.layer)) {
            (Arch::Gemma3, Some(la), Some(_)) => Some(la.rope_freq_base),
            _ => None,
        };
        let (freq_base, freq_scale) = match local {
            Some(base) => (base, 1.0),
            None => (hp.rope_freq_base, self.freq_scale),
        };
        let rp = |heads| RopeParams {
            n_tokens: self.n,
            n_heads: heads,
            head_dim: hp.head_dim,
            n_rot: hp.n_rot,
            freq_base,
            freq_scale,
            neox: hp.arch.rope_layout() == RopeLayout::NeoX,
        };
        let rf = self
            .rope_factors
            .as_ref()
            .filter(|_| local.is_none())
            .map(|v| v as &dyn crate::backend::DeviceBuffer);
        let (q, k) = (self.act(Act::Q)?, self.act(Act::K)?);
        self.dev.rope_qk(
            self.stream,
            &q,
            &k,
            &self.s.pos,
            rf,
            rp(hp.n_head),
            hp.n_head_kv,
        )?;
        Ok(())
    }

    fn attention(&mut self) -> Result<()> {
        self.before_write(Act::Attn)?;
        let (dev, st, hp, l) = (self.dev, self.stream, self.hp, self.layer);
        let (qd, kd, vd) = (hp.q_dim(), hp.k_dim(), hp.v_dim());
        let ad = Act::Attn.width(hp);
        let (q, k, v, attn) = (
            self.act(Act::Q)?,
            self.act(Act::K)?,
            self.act(Act::V)?,
            self.act(Act::Attn)?,
        );
        // Each sequence stores its keys and values in its own cache and attends over it; the
        // projections before and after run once over every row of the step. A decode step of
        // the 8-bit path also quantizes the output for the O product in the same launch.
        let fuse_q8 = self.q8_step()
            && ad % 32 == 0
            && self.kv_layout.head_dim % 32 == 0
            && self.segs.iter().all(|sg| sg.n == 1);
        let pool = self
            .kv_pool
            .ok_or_else(|| bad("attention without a KV pool".into()))?;
        let (kc, vc) = pool.planes(l, self.kv_layout)?;
        let batched = self.seq_table >= 2;
        if batched {
            // One K/V store and one attention launch for every short decoding sequence.
            let ap = AttnParams {
                n_tokens: 1,
                n_heads: hp.n_head,
                kv: self.kv_layout,
                pos0: 0,
                scale: hp.attn_scale,
                window: hp.local_window(l).unwrap_or(0),
            };
            let xq = View::of(&self.s.xq);
            let q8 = if fuse_q8 {
                Some((
                    xq.slice(0, self.n * ad)?,
                    xq.slice(self.n * ad, self.n * (ad / 32) * 8)?,
                ))
            } else {
                None
            };
            // SAFETY: the owner wrote `seq_table` entries into s.seqs for exactly the segments
            // `batched_decode` selects (their block tables in s.tables, covering their
            // positions, which are below seq_cap; rows below n).
            unsafe {
                dev.kv_store2_batch(
                    st,
                    &k,
                    &v,
                    &self.s.seqs,
                    self.seq_table,
                    self.n,
                    (&kc, &vc),
                    pool.blocks,
                    self.kv_layout,
                )?;
                dev.attention_decode_batch(
                    st,
                    &q,
                    &self.s.seqs,
                    self.seq_table,
                    self.n,
                    (&kc, &vc),
                    pool.blocks,
                    &attn,
                    ap,
                    q8.as_ref().map(|(a, b)| {
                        (
                            a as &dyn crate::backend::DeviceBuffer,
                            b as &dyn crate::backend::DeviceBuffer,
                        )
                    }),
                )?;
            }
        }
        for sg in &self.segs {
            if batched && batched_decode(sg.n, sg.pos) {
                continue;
            }
            let pages = KvPages {
                table: &sg.table,
                pool: pool.blocks,
            };
            let ks = k.slice(sg.first * kd * 4, sg.n * kd * 4)?;
            let vs = v.slice(sg.first * vd * 4, sg.n * vd * 4)?;
            dev.kv_store2_paged(st, &ks, &kc, &vs, &vc, self.kv_layout, pages, sg.n, sg.pos)?;
            let ap = AttnParams {
                n_tokens: sg.n,
                n_heads: hp.n_head,
                kv: self.kv_layout,
                pos0: sg.pos,
                scale: hp.attn_scale,
                window: hp.local_window(l).unwrap_or(0),
            };
            let qs = q.slice(sg.first * qd * 4, sg.n * qd * 4)?;
            let os = attn.slice(sg.first * ad * 4, sg.n * ad * 4)?;
            // A long decode context is split across blocks through `attn_part` (one
            // sequence at a time: the stream orders the segments' uses of it).
            let part = Some(&self.s.attn_part as &dyn crate::backend::DeviceBuffer);
            if fuse_q8 {
                // Row r of the q8a layout: quants at r * ad, its (d, sum) pairs after all rows'.
                let xq = View::of(&self.s.xq);
                let quants = xq.slice(sg.first * ad, ad)?;
                let scales = xq.slice(self.n * ad + sg.first * (ad / 32) * 8, ad / 32 * 8)?;
                let q8 = Some((&quants as &dyn DeviceBuffer, &scales as &dyn DeviceBuffer));
                dev.attention_paged(st, &qs, (&kc, &vc), &os, ap, Some(pages), q8, part)?;
            } else {
                dev.attention_paged(st, &qs, (&kc, &vc), &os, ap, Some(pages), None, part)?;
            }
        }
        if fuse_q8 {
            self.q8_of = Some(Act::Attn);
        }
        Ok(())
    }

    fn add(&mut self, acc: Act, x: Act) -> Result<()> {
        if x == Act::Proj && acc != Act::Proj {
            if let Some((w, m)) = self.pending.take() {
                // The deferred product, added to `acc` in its epilogue (`Proj` itself is not
                // written: nothing in the block reads it before the next product fills it).
                if self.q8_of == Some(acc) {
                    self.q8_of = None;
                }
                let a = self.act(acc)?;
                self.dev
                    .mmvq_q8_into(self.stream, &w, m, &self.s.xq, &a, self.n, true)?;
                return Ok(());
            }
        }
        self.before_write(acc)?;
        let (a, xv) = (self.act(acc)?, self.act(x)?);
        let len = self.n * acc.width(self.hp);
        self.dev.add(self.stream, &a, &xv, &a, len)?;
        Ok(())
    }

    fn glu(&mut self, act: FfnActivation) -> Result<()> {
        self.before_write(Act::Gate)?;
        let (g, u) = (self.act(Act::Gate)?, self.act(Act::Up)?);
        let len = self.n * self.hp.n_ff;
        if self.q8_step() && self.hp.n_ff % 32 == 0 {
            // The down projection's input: activated and quantized in one launch.
            let gelu = act == FfnActivation::GeluTanh;
            self.dev
                .glu_q8a(self.stream, gelu, &g, &u, &g, &self.s.xq, len)?;
            self.q8_of = Some(Act::Gate);
        } else {
            gated(self.dev, self.stream, act, &g, &u, len)?;
        }
        Ok(())
    }

    /// The MoE FFN: [`Self::route`], then each chosen expert ([`Self::expert`]) from its
    /// rows of the stacked expert tensors, in ascending order: the same code as a step whose
    /// experts run from units of their own.
    fn experts(&mut self, w: &LayerSet<DeviceTensor<'a>>) -> Result<()> {
        self.route(w)?;
        let (d, fe) = (self.hp.n_embd, self.hp.moe.map_or(0, |m| m.n_ff_exp));
        let names = [Role::Gate, Role::Up, Role::Down].map(|r| self.name(r));
        let stacked = |t: &DeviceTensor<'a>, name: &str, e: usize, rows: usize| {
            let (v, m) = mat(t, name)?;
            let rb = m.qtype.row_bytes(m.ncols as u64).unwrap_or(0) as usize;
            let block = QMatrix { nrows: rows, ..m };
            Ok::<_, GpuForwardError>((v.slice(e * rows * rb, rows * rb)?, block))
        };
        for e in self.routes.experts() {
            let g = stacked(&w.w_gate, &names[0], e, fe)?;
            let u = stacked(&w.w_up, &names[1], e, fe)?;
            let dn = stacked(&w.w_down, &names[2], e, d)?;
            self.expert_mats(e, [g, u, dn])?;
        }
        Ok(())
    }

    /// The router of a MoE layer: logits on the device, the top-k choice on the host (the same
    /// `moe::route` as the CPU) into `routes`; `Proj` zeroed, then the shared expert (Qwen2-MoE)
    /// added on every row, scaled by its sigmoid gate. Correct, not yet fast: one host round
    /// trip per layer, and the experts then run per token.
    fn route(&mut self, w: &LayerSet<DeviceTensor<'a>>) -> Result<()> {
        self.flush()?;
        // The experts overwrite the scratch activations (and not through `s.xq`'s products).
        self.q8_of = None;
        let hp = self.hp;
        let (Some(moe), Some(router)) = (hp.moe, w.router.as_ref()) else {
            return Err(bad("a router without MoE hyper-parameters".into()));
        };
        let (n, d) = (self.n, hp.n_embd);
        let (ne, fe) = (moe.n_expert, moe.n_ff_exp);
        // Scratch: the attention output is consumed; it holds the router logits, then each
        // expert's output row. Gate/up hold one expert's FFN row.
        let attn_cap = self.n * Act::Attn.width(hp);
        if n * ne > attn_cap || d > Act::Attn.width(hp) || fe > hp.n_ff {
            return Err(GpuForwardError::Unsupported(format!(
                "experts of this shape ({ne} experts of width {fe}, d {d}) in the layer's scratch"
            )));
        }
        let (xn, attn) = (self.act(Act::Xn)?, self.act(Act::Attn)?);
        let (rv, rm) = mat(router, &self.name(Role::Router))?;
        let logits = attn.prefix(n * ne * 4)?;
        self.dev.mmvq_n(self.stream, &rv, rm, &xn, &logits, n)?;
        self.stream.synchronize()?;
        let mut all = self.s.attn.to_vec::<f32>(n * ne)?;
        self.routes
            .from_logits(&mut all, ne, moe.n_expert_used, moe.norm_top_k);
        // The stream is idle (synchronized above): a plain memset orders with it.
        self.s.proj.zero()?;
        if let (Some(gi), Some(sg), Some(su), Some(sd)) =
            (&w.shexp_gate_inp, &w.shexp_gate, &w.shexp_up, &w.shexp_down)
        {
            self.shared_expert(n, [gi, sg, su, sd], hp.arch.ffn_activation())?;
        }
        Ok(())
    }
}
