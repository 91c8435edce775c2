//! The llama-family forward pass on the CPU, layer-granular so a runtime can run each block as
//! soon as its weights are resident: `embed`, `forward_layer` per block, `output`; `forward`
//! chains them over the memory-mapped weights.

use super::attention::attention_batch;
use super::block::{experts_separable, run_block, run_block_routed, Act, BlockOps, Role};
use super::error::ModelError;
use super::hparams::{Arch, FfnActivation, HParams};
use super::kv::{grow, Scratch, Sequence, SequenceConfig};
use super::moe::{expert_ffn, route_block, ExpertWeights, SharedExpert};
use super::names::TensorId;
use super::ops;
use super::ops::Precision;
use super::paged::SharedKvPool;
use super::rope::Rope;
use super::weights::{LayerWeights, ModelLayout, WeightView};
use crate::gguf::GgufFile;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::path::Path;

/// A loaded model: the mapped file, its hyper-parameters and where every weight lives.
#[derive(Debug, Clone)]
pub struct Model {
    file: GgufFile,
    hp: HParams,
    layout: ModelLayout,
    rope: Rope,
    /// RoPE of Gemma 3's sliding-window layers (their own base, no scaling); other families
    /// use one RoPE for every layer.
    rope_local: Option<Rope>,
    /// LongRoPE: the rotation with the long factors and the original context past which a
    /// sequence uses it (`rope` then holds the short factors).
    rope_long: Option<(Rope, usize)>,
}

impl Model {
    /// Maps a GGUF file and checks it fully before any compute: architecture, hyper-parameters,
    /// every tensor's shape and type, no tensor left unused.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let hp = HParams::try_from(file.metadata())?;
        let layout = ModelLayout::from_file(&file, &hp)?;
        let freqs = match &layout.rope_freqs {
            Some(t) => {
                let mut f = vec![0.0; hp.n_rot / 2];
                ops::dequantize(&t.view(file.bytes()), &t.name, &mut f)?;
                Some(f)
            }
            None => None,
        };
        let factors = |t: &super::TensorRef| -> Result<Vec<f32>, ModelError> {
            let mut f = vec![0.0; hp.n_rot / 2];
            ops::dequantize(&t.view(file.bytes()), &t.name, &mut f)?;
            Ok(f)
        };
        let (rope, rope_long) = match &layout.long_rope {
            Some(lr) => {
                let af = hp.rope_attn_factor;
                let short = Rope::new(&hp, Some(&factors(&lr.short)?)).scaled(af);
                let long = Rope::new(&hp, Some(&factors(&lr.long)?)).scaled(af);
                (short, Some((long, lr.orig_ctx)))
            }
            None => (Rope::new(&hp, freqs.as_deref()), None),
        };
        let rope_local = hp
            .local_attention
            .filter(|_| hp.arch == Arch::Gemma3)
            .map(|la| Rope::new_local(&hp, la.rope_freq_base));
        Ok(Self {
            file,
            hp,
            layout,
            rope,
            rope_local,
            rope_long,
        })
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The `rope_freqs` divisors (`[n_rot / 2]`, Llama 3.1 frequency factors) as f32, if the
    /// model has them.
    pub fn rope_freq_factors(&self) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(t) = &self.layout.rope_freqs else {
            return Ok(None);
        };
        let mut f = vec![0.0; self.hp.n_rot / 2];
        ops::dequantize(&t.view(self.file.bytes()), &t.name, &mut f)?;
        Ok(Some(f))
    }

    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn n_vocab(&self) -> usize {
        self.layout.n_vocab
    }

    /// A new sequence (KV cache + position) for this model, with a KV pool of its own.
    pub fn new_sequence(&self, cfg: SequenceConfig) -> Result<Sequence, ModelError> {
        Sequence::new(&self.hp, cfg)
    }

    /// A new sequence drawing its KV blocks from `pool` (shared by a runtime's sequences).
    pub fn new_sequence_in(
        &self,
        cfg: SequenceConfig,
        pool: SharedKvPool,
    ) -> Result<Sequence, ModelError> {
        Sequence::in_pool(&self.hp, cfg, pool)
    }

    /// Views of layer `l`'s weights in the mapped file.
    pub fn layer_weights(&self, l: usize) -> LayerWeights<'_> {
        self.layout.layers[l].views(self.file.bytes())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let vocab = self.n_vocab();
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&token) => Err(ModelError::TokenOutOfRange { token, vocab }),
            None => Ok(()),
        }
    }

    /// Embedding rows of `tokens` into `hidden` (`[n_tokens, d]`).
    pub fn embed(&self, tokens: &[u32], hidden: &mut [f32]) -> Result<(), ModelError> {
        self.check_tokens(tokens)?;
        let t = &self.layout.token_embd;
        let w = t.view(self.file.bytes());
        let d = self.hp.n_embd;
        for (&tok, row) in tokens.iter().zip(hidden.chunks_exact_mut(d)) {
            ops::dequantize_row(&w, tok as usize, &t.name, row)?;
        }
        self.scale_embeddings(hidden);
        Ok(())
    }

    /// What follows the table lookup: the family's embedding scale (Gemma: `sqrt(d)`). A
    /// runtime that reads embedding rows itself calls this on them.
    pub fn scale_embeddings(&self, hidden: &mut [f32]) {
        let s = self.hp.embed_scale;
        if s != 1.0 {
            hidden.iter_mut().for_each(|v| *v *= s);
        }
    }

    /// Whether [`Model::finish_logits`] changes the logits (a final soft-cap: Gemma 2 and 3),
    /// which may make two different maxima equal.
    pub fn has_final_softcap(&self) -> bool {
        self.hp.final_softcap.is_some()
    }

    /// What follows the output head: the family's final soft-cap, if any. A runtime that runs
    /// the head itself calls this on the logits (any subset of them: it is element-wise).
    pub fn finish_logits(&self, logits: &mut [f32]) {
        if let Some(cap) = self.hp.final_softcap {
            ops::softcap(logits, cap);
        }
    }

    /// The RoPE of layer `l` for a sequence of context `ctx` (local layers may have their own
    /// base; LongRoPE takes its long factors when `ctx` passes the original context, as
    /// llama.cpp does by its context size).
    fn rope_of(&self, l: usize, ctx: usize) -> &Rope {
        match (&self.rope_local, self.hp.local_window(l), &self.rope_long) {
            (Some(local), Some(_), _) => local,
            (_, _, Some((long, orig_ctx))) if ctx > *orig_ctx => long,
            _ => &self.rope,
        }
    }

    /// Runs block `layer` over `hidden` (`[n_tokens, d]`, updated in place) for the tokens at
    /// positions `seq.pos() ..`, writing their keys and values into `seq`'s cache. Call it for
    /// every layer in order, then `seq.advance(n_tokens)`.
    pub fn forward_layer(
        &self,
        layer: usize,
        w: &LayerWeights,
        seq: &mut Sequence,
        hidden: &mut [f32],
    ) -> Result<(), ModelError> {
        let n = hidden.len() / self.hp.n_embd.max(1);
        let mut scratch = std::mem::take(&mut seq.scratch);
        let r = self.forward_layer_batch(layer, w, &mut [&mut *seq], &[n], hidden, &mut scratch);
        seq.scratch = scratch;
        r
    }

    /// Block `layer` over the rows of several sequences at once (continuous batching):
    /// `hidden` is `[sum(rows), d]`, the first `rows[0]` rows belong to `seqs[0]` (positions
    /// `seqs[0].pos() ..`), the next `rows[1]` to `seqs[1]`, and so on. The projections run once
    /// over every row, so each weight is read once per step however many sequences it serves;
    /// the attention of each sequence reads only its own cache. Row for row the result equals
    /// [`Self::forward_layer`] on each sequence alone (bit for bit in `Precision::Exact`).
    /// Every sequence must have the same precision. Call it for every layer in order, then
    /// `advance` each sequence by its rows.
    pub fn forward_layer_batch(
        &self,
        layer: usize,
        w: &LayerWeights,
        seqs: &mut [&mut Sequence],
        rows: &[usize],
        hidden: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<(), ModelError> {
        let prec = self.check_batch(seqs, rows, hidden)?;
        let mut ops = CpuBlock::new(self, layer, seqs, rows, hidden, scratch, prec)?;
        run_block(&mut ops, &self.hp, w)
    }

    /// [`Self::forward_layer_batch`] for a mixture-of-experts layer whose experts run from
    /// units of their own: the layer up to its router ([`run_block_routed`]); returns the
    /// experts the step's tokens chose, ascending. Each then runs with
    /// [`Self::forward_expert`], and [`Self::forward_layer_finish`] ends the layer. The same
    /// bits as the whole layer in one call.
    pub fn forward_layer_batch_routed(
        &self,
        layer: usize,
        w: &LayerWeights,
        seqs: &mut [&mut Sequence],
        rows: &[usize],
        hidden: &mut [f32],
        scratch: &mut Scratch,
    ) -> Result<Vec<usize>, ModelError> {
        if !experts_separable(w) {
            return Err(ModelError::UnsupportedFeature {
                arch: self.hp.arch.name().to_string(),
                what: format!("layer {layer}'s experts apart from the layer"),
            });
        }
        let prec = self.check_batch(seqs, rows, hidden)?;
        let mut ops = CpuBlock::new(self, layer, seqs, rows, hidden, scratch, prec)?;
        run_block_routed(&mut ops, w)?;
        scratch.routes_prec = prec;
        Ok(scratch.routes.experts())
    }

    /// Expert `e` of layer `layer` on the tokens the router sent it (after
    /// [`Self::forward_layer_batch_routed`]), from its own weights.
    pub fn forward_expert(
        &self,
        layer: usize,
        e: usize,
        w: &ExpertWeights,
        scratch: &mut Scratch,
    ) -> Result<(), ModelError> {
        let len = scratch.routes.n * self.hp.n_embd;
        let s = &mut *scratch;
        expert_ffn(
            self.hp.arch.ffn_activation(),
            layer,
            e,
            w,
            &s.routes,
            s.xn.get(..len).unwrap_or(&[]),
            s.proj.get_mut(..len).unwrap_or(&mut []),
            s.routes_prec,
        )
    }

    /// The end of a routed layer: `hidden += ` the experts' sum.
    pub fn forward_layer_finish(
        &self,
        hidden: &mut [f32],
        scratch: &Scratch,
    ) -> Result<(), ModelError> {
        let len = scratch.routes.n * self.hp.n_embd;
        if hidden.len() != len || scratch.proj.len() < len {
            return Err(ModelError::BatchShape {
                rows: vec![scratch.routes.n],
                sequences: 1,
                values: hidden.len(),
                width: self.hp.n_embd,
            });
        }
        ops::add_assign(hidden, &scratch.proj[..len]);
        Ok(())
    }

    /// Checks a batch's shape and room; returns its one precision.
    fn check_batch(
        &self,
        seqs: &[&mut Sequence],
        rows: &[usize],
        hidden: &[f32],
    ) -> Result<Precision, ModelError> {
        let d = self.hp.n_embd;
        let n = hidden.len() / d;
        if rows.len() != seqs.len() || rows.iter().sum::<usize>() != n || n * d != hidden.len() {
            return Err(ModelError::BatchShape {
                rows: rows.to_vec(),
                sequences: seqs.len(),
                values: hidden.len(),
                width: d,
            });
        }
        let prec = seqs.first().map_or(Precision::default(), |s| s.precision());
        for (seq, &r) in seqs.iter().zip(rows) {
            seq.check_room(r)?;
            if seq.precision() != prec {
                return Err(ModelError::BatchPrecision);
            }
        }
        Ok(prec)
    }

    /// Final norm and output head for one hidden row (`[d]`); the logits (`[n_vocab]`) live in
    /// `seq`'s scratch space until the next call.
    pub fn output<'s>(
        &self,
        hidden: &[f32],
        seq: &'s mut Sequence,
    ) -> Result<&'s [f32], ModelError> {
        let d = self.hp.n_embd;
        let bytes = self.file.bytes();
        let prec = seq.precision();
        let s = &mut seq.scratch;
        let on = &self.layout.output_norm;
        let norm_w = grow(&mut s.norm_w, d)?;
        ops::dequantize(&on.view(bytes), &on.name, norm_w)?;
        let xn = grow(&mut s.xn, d)?;
        ops::rms_norm(hidden, norm_w, self.hp.rms_eps, xn);
        let head = self.layout.head();
        let logits = grow(&mut s.logits, self.n_vocab())?;
        ops::linear(&head.view(bytes), &head.name, xn, 1, logits, prec)?;
        self.finish_logits(logits);
        Ok(logits)
    }

    /// Runs `tokens` (a whole prompt at once, or one decode token) through every layer using the
    /// mapped weights, advances the sequence, and returns the last position's logits.
    pub fn forward<'s>(
        &self,
        tokens: &[u32],
        seq: &'s mut Sequence,
    ) -> Result<&'s [f32], ModelError> {
        self.check_tokens(tokens)?;
        seq.check_room(tokens.len())?;
        let d = self.hp.n_embd;
        let n = tokens.len();
        let mut hidden = std::mem::take(&mut seq.scratch.hidden);
        let result = (|| {
            let h = grow(&mut hidden, n * d)?;
            self.embed(tokens, h)?;
            for l in 0..self.hp.n_layer {
                self.forward_layer(l, &self.layer_weights(l), seq, h)?;
            }
            seq.advance(n)?;
            self.output(&h[(n - 1) * d..], seq).map(|_| ())
        })();
        seq.scratch.hidden = hidden;
        result?;
        Ok(&seq.scratch.logits[..self.n_vocab()])
    }
}

/// Gated-activation values from which the step's activation runs in parallel, and the
/// values per task.
const GLU_PARALLEL_MIN: usize = 4096;
const GLU_CHUNK: usize = 1024;

/// The CPU's ops for [`run_block`]: the step's activations are the scratch vectors (grown
/// once per step to the step's rows), `Hidden` is the caller's slice.
struct CpuBlock<'m, 'b, 's, 'w> {
    model: &'m Model,
    layer: usize,
    seqs: &'b mut [&'s mut Sequence],
    rows: &'b [usize],
    hidden: &'b mut [f32],
    s: &'b mut Scratch,
    prec: Precision,
    /// Rows of the step.
    n: usize,
    /// The weights' lifetime (`BlockOps::W`).
    weights: PhantomData<WeightView<'w>>,
}

impl<'m, 'b, 's, 'w> CpuBlock<'m, 'b, 's, 'w> {
    fn new(
        model: &'m Model,
        layer: usize,
        seqs: &'b mut [&'s mut Sequence],
        rows: &'b [usize],
        hidden: &'b mut [f32],
        s: &'b mut Scratch,
        prec: Precision,
    ) -> Result<Self, ModelError> {
        let hp = &model.hp;
        let n = hidden.len() / hp.n_embd.max(1);
        let mut ops = Self {
            model,
            layer,
            seqs,
            rows,
            hidden,
            s,
            prec,
            n,
            weights: PhantomData,
        };
        for a in [
            Act::Xn,
            Act::Q,
            Act::K,
            Act::V,
            Act::Attn,
            Act::Proj,
            Act::Gate,
            Act::Up,
        ] {
            let len = n * a.width(hp);
            grow(ops.buf(a), len)?;
        }
        Ok(ops)
    }

    /// The scratch vector behind `a` (not `Hidden`, which is the caller's slice).
    fn buf(&mut self, a: Act) -> &mut Vec<f32> {
        scratch_of(self.s, a)
    }

    fn len(&self, a: Act) -> usize {
        self.n * a.width(&self.model.hp)
    }

    fn act(&mut self, a: Act) -> &[f32] {
        let len = self.len(a);
        match a {
            Act::Hidden => &self.hidden[..len],
            _ => &self.buf(a)[..len],
        }
    }

    fn act_mut(&mut self, a: Act) -> &mut [f32] {
        let len = self.len(a);
        match a {
            Act::Hidden => &mut self.hidden[..len],
            _ => &mut self.buf(a)[..len],
        }
    }

    /// Runs `f` with `out`'s values taken out of the scratch (so `f` may read any other
    /// activation); `out` must not be `Hidden`.
    fn with_out<R>(&mut self, out: Act, f: impl FnOnce(&mut Self, &mut [f32]) -> R) -> R {
        let len = self.len(out);
        let mut v = std::mem::take(self.buf(out));
        let r = f(self, &mut v[..len]);
        *self.buf(out) = v;
        r
    }

    fn name(&self, role: Role) -> TensorId {
        TensorId {
            kind: role.kind(),
            layer: Some(self.layer),
        }
    }

    /// `w` (a norm or bias vector) as f32 in `dst`'s first `width` values.
    fn vector<'v>(
        &self,
        w: &WeightView,
        role: Role,
        dst: &'v mut Vec<f32>,
        width: usize,
    ) -> Result<&'v [f32], ModelError> {
        let out = grow(dst, width)?;
        ops::dequantize(w, &self.name(role), out)?;
        Ok(out)
    }
}

/// The scratch vector behind `a`; `Hidden` is never in the scratch (callers keep it apart),
/// `xn` keeps the match total.
fn scratch_of(s: &mut Scratch, a: Act) -> &mut Vec<f32> {
    match a {
        Act::Xn | Act::Hidden => &mut s.xn,
        Act::Q => &mut s.q,
        Act::K => &mut s.k,
        Act::V => &mut s.v,
        Act::Attn => &mut s.attn,
        Act::Proj => &mut s.proj,
        Act::Gate => &mut s.gate,
        Act::Up => &mut s.up,
    }
}

impl<'w> BlockOps for CpuBlock<'_, '_, '_, 'w> {
    type W = WeightView<'w>;
    type Error = ModelError;

    fn norm(&mut self, x: Act, w: &WeightView<'w>, role: Role, out: Act) -> Result<(), ModelError> {
        let eps = self.model.hp.rms_eps;
        let mut nw = std::mem::take(&mut self.s.norm_w);
        let r = (|| {
            let nw = self.vector(w, role, &mut nw, x.width(&self.model.hp))?;
            if x == out {
                ops::rms_norm_in_place(self.act_mut(x), nw, eps);
            } else {
                self.with_out(out, |me, o| ops::rms_norm(me.act(x), nw, eps, o));
            }
            Ok(())
        })();
        self.s.norm_w = nw;
        r
    }

    fn head_norm(&mut self, x: Act, w: &WeightView<'w>, role: Role) -> Result<(), ModelError> {
        let hp = &self.model.hp;
        let (eps, hd) = (hp.rms_eps, hp.head_dim);
        let mut hw = std::mem::take(&mut self.s.bias);
        let r = self.vector(w, role, &mut hw, hd).map(|hw| {
            ops::rms_norm_in_place(self.act_mut(x), hw, eps);
        });
        self.s.bias = hw;
        r
    }

    fn linear(&mut self, x: Act, outs: &[(&WeightView<'w>, Role, Act)]) -> Result<(), ModelError> {
        let (n, prec) = (self.n, self.prec);
        if let [(w, role, out)] = outs {
            let name = self.name(*role);
            return self.with_out(*out, |me, y| ops::linear(w, &name, me.act(x), n, y, prec));
        }
        // Several projections of one input (Q/K/V, gate/up) in one pass.
        let names: Vec<TensorId> = outs.iter().map(|(_, role, _)| self.name(*role)).collect();
        let mut ys: Vec<Vec<f32>> = outs
            .iter()
            .map(|(_, _, o)| std::mem::take(self.buf(*o)))
            .collect();
        let r = {
            let ws: Vec<(&WeightView, &dyn std::fmt::Display)> = outs
                .iter()
                .zip(&names)
                .map(|((w, _, _), name)| (*w, name as &dyn std::fmt::Display))
                .collect();
            let lens: Vec<usize> = outs.iter().map(|(_, _, o)| self.len(*o)).collect();
            let mut slices: Vec<&mut [f32]> = ys
                .iter_mut()
                .zip(lens)
                .map(|(y, len)| &mut y[..len])
                .collect();
            let xs = self.act(x);
            ops::linear_fused(&ws, xs, n, &mut slices, prec)
        };
        for ((_, _, o), y) in outs.iter().zip(ys) {
            *self.buf(*o) = y;
        }
        r
    }

    fn add_bias(&mut self, x: Act, b: &WeightView<'w>, role: Role) -> Result<(), ModelError> {
        let width = x.width(&self.model.hp);
        let mut bias = std::mem::take(&mut self.s.bias);
        let r = self.vector(b, role, &mut bias, width).map(|bias| {
            for row in self.act_mut(x).chunks_exact_mut(width) {
                ops::add_assign(row, bias);
            }
        });
        self.s.bias = bias;
        r
    }

    fn rope(&mut self) -> Result<(), ModelError> {
        let hp = &self.model.hp;
        let (qd, kd, hd) = (hp.q_dim(), hp.k_dim(), hp.head_dim);
        let n_rot = self.model.rope.n_rot();
        let s = &mut *self.s;
        let cs = grow(&mut s.rope_cs, self.n * n_rot)?;
        let (q, k) = (&mut s.q, &mut s.k);
        // Each sequence's rows at its own positions, with the rotation of its context.
        let mut first = 0;
        for (seq, &r) in self.seqs.iter().zip(self.rows) {
            let rope = self.model.rope_of(self.layer, seq.ctx());
            let rows = first..first + r;
            let cs = &mut cs[rows.start * n_rot..rows.end * n_rot];
            for (c, p) in cs.chunks_exact_mut(n_rot).zip(seq.pos()..) {
                rope.cos_sin(p, c);
            }
            for (i, c) in rows.zip(cs.chunks_exact(n_rot)) {
                for head in q[i * qd..(i + 1) * qd].chunks_exact_mut(hd) {
                    rope.apply(head, c);
                }
                for head in k[i * kd..(i + 1) * kd].chunks_exact_mut(hd) {
                    rope.apply(head, c);
                }
            }
            first += r;
        }
        Ok(())
    }

    fn attention(&mut self) -> Result<(), ModelError> {
        let (model, layer, n) = (self.model, self.layer, self.n);
        let hp = &model.hp;
        let (qd, kd, vd) = (hp.q_dim(), hp.k_dim(), hp.v_dim());
        let width = hp.n_head * hp.head_dim_v;
        let s = &mut *self.s;
        let mut first = 0;
        for (seq, &r) in self.seqs.iter_mut().zip(self.rows) {
            let pos0 = seq.pos();
            seq.kv.store(
                layer,
                pos0,
                &s.k[first * kd..(first + r) * kd],
                &s.v[first * vd..(first + r) * vd],
                r,
            )?;
            first += r;
        }
        attention_batch(
            hp,
            layer,
            self.seqs,
            self.rows,
            &s.q[..n * qd],
            &mut s.scores,
            &mut s.heads,
            &mut s.attn[..n * width],
        )
    }

    fn add(&mut self, acc: Act, x: Act) -> Result<(), ModelError> {
        if acc == Act::Hidden {
            // The residual stream is the caller's slice, apart from the scratch.
            let len = self.len(x);
            let xs = &scratch_of(self.s, x)[..len];
            ops::add_assign(&mut self.hidden[..len], xs);
        } else {
            self.with_out(acc, |me, a| ops::add_assign(a, me.act(x)));
        }
        Ok(())
    }

    fn glu(&mut self, act: FfnActivation) -> Result<(), ModelError> {
        let (len, prec) = (self.len(Act::Gate), self.prec);
        let s = &mut *self.s;
        let (gate, up) = (&mut s.gate[..len], &s.up[..len]);
        // An exp per value: a batched step's rows (8 x 1536 in SmolLM2's decode, ~60 us) are
        // worth a fork-join, one decode row is not. Element-wise, so any split gives the same
        // bits.
        if len >= GLU_PARALLEL_MIN {
            gate.par_chunks_mut(GLU_CHUNK)
                .zip(up.par_chunks(GLU_CHUNK))
                .for_each(|(g, u)| ops::gated(act, g, u, prec));
        } else {
            ops::gated(act, gate, up, prec);
        }
        Ok(())
    }

    fn experts(&mut self, w: &LayerWeights<'w>) -> Result<(), ModelError> {
        // The router, then every chosen expert from its rows of the stacked tensors: the same
        // code as a step whose experts run from units of their own.
        self.route(w)?;
        let hp = &self.model.hp;
        let (fe, d) = (hp.moe.map_or(0, |m| m.n_ff_exp), hp.n_embd);
        let len = self.len(Act::Proj);
        let s = &mut *self.s;
        for e in s.routes.experts() {
            let (gate, up) = (w.w_gate.rows(e * fe, fe), w.w_up.rows(e * fe, fe));
            let down = w.w_down.rows(e * d, d);
            let ew = ExpertWeights {
                gate: &gate,
                up: &up,
                down: &down,
            };
            expert_ffn(
                hp.arch.ffn_activation(),
                self.layer,
                e,
                &ew,
                &s.routes,
                &s.xn[..len],
                &mut s.proj[..len],
                self.prec,
            )?;
        }
        Ok(())
    }

    fn route(&mut self, w: &LayerWeights<'w>) -> Result<(), ModelError> {
        let hp = &self.model.hp;
        let (Some(router), Some(moe)) = (&w.router, &hp.moe) else {
            return Err(ModelError::UnsupportedFeature {
                arch: hp.arch.name().to_string(),
                what: "a router without MoE hyper-parameters".into(),
            });
        };
        let shared = match (&w.shexp_gate_inp, &w.shexp_gate, &w.shexp_up, &w.shexp_down) {
            (Some(gate_inp), Some(gate), Some(up), Some(down)) => Some(SharedExpert {
                gate_inp,
                gate,
                up,
                down,
            }),
            _ => None,
        };
        let (n, len) = (self.n, self.len(Act::Proj));
        let s = &mut *self.s;
        route_block(
            moe,
            hp.arch.ffn_activation(),
            self.layer,
            router,
            shared.as_ref(),
            &s.xn[..len],
            n,
            &mut s.proj[..len],
            self.prec,
            &mut s.routes,
        )
    }
}
