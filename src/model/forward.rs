//! The llama-family forward pass on the CPU, layer-granular so a runtime can run each block as
//! soon as its weights are resident: `embed`, `forward_layer` per block, `output`; `forward`
//! chains them over the memory-mapped weights.

use super::error::ModelError;
use super::hparams::{Arch, FfnActivation, HParams};
use super::kv::{grow, Scratch, Sequence, SequenceConfig};
use super::moe::{moe_ffn, MoeWeights};
use super::names::TensorId;
use super::ops;
use super::ops::Precision;
use super::paged::SharedKvPool;
use super::rope::Rope;
use super::weights::{LayerWeights, ModelLayout};
use crate::gguf::GgufFile;
use rayon::prelude::*;
use std::cell::RefCell;
use std::path::Path;

thread_local! {
    /// f32 copies of one KV head's keys and values (attention over an f16 cache), per thread,
    /// reused across layers and tokens.
    static KV_F32: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

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
        let rope = Rope::new(&hp, freqs.as_deref());
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

    /// What follows the output head: the family's final soft-cap, if any. A runtime that runs
    /// the head itself calls this on the logits (any subset of them: it is element-wise).
    pub fn finish_logits(&self, logits: &mut [f32]) {
        if let Some(cap) = self.hp.final_softcap {
            ops::softcap(logits, cap);
        }
    }

    /// The RoPE of layer `l` (local layers may have their own base).
    fn rope_of(&self, l: usize) -> &Rope {
        match (&self.rope_local, self.hp.local_window(l)) {
            (Some(local), Some(_)) => local,
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
        let hp = &self.hp;
        let d = hp.n_embd;
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
        let (qd, kd, vd) = (hp.q_dim(), hp.k_dim(), hp.v_dim());
        let name = |kind| TensorId {
            kind,
            layer: Some(layer),
        };
        use super::names::TensorKind as K;

        // --- attention
        let s = &mut *scratch;
        let norm_w = grow(&mut s.norm_w, d)?;
        ops::dequantize(&w.attn_norm, &name(K::AttnNorm), norm_w)?;
        let xn = grow(&mut s.xn, n * d)?;
        ops::rms_norm(hidden, norm_w, hp.rms_eps, xn);
        let q = grow(&mut s.q, n * qd)?;
        let k = grow(&mut s.k, n * kd)?;
        let v = grow(&mut s.v, n * vd)?;
        let (nq, nk, nv) = (name(K::AttnQ), name(K::AttnK), name(K::AttnV));
        ops::linear_fused(
            &[(&w.wq, &nq), (&w.wk, &nk), (&w.wv, &nv)],
            xn,
            n,
            &mut [&mut *q, &mut *k, &mut *v],
            prec,
        )?;
        for (b, out, kind) in [
            (&w.bq, &mut *q, K::AttnQBias),
            (&w.bk, &mut *k, K::AttnKBias),
        ]
        .into_iter()
        .chain([(&w.bv, &mut *v, K::AttnVBias)])
        {
            if let Some(b) = b {
                let bias = grow(&mut s.bias, b.cols)?;
                ops::dequantize(b, &name(kind), bias)?;
                for row in out.chunks_exact_mut(b.cols) {
                    ops::add_assign(row, bias);
                }
            }
        }

        // QK-norm: every query and key head RMS-normalised over its own width.
        for (wn, x, kind) in [
            (&w.q_norm, &mut *q, K::AttnQNorm),
            (&w.k_norm, &mut *k, K::AttnKNorm),
        ] {
            if let Some(wn) = wn {
                let hw = grow(&mut s.bias, hp.head_dim)?;
                ops::dequantize(wn, &name(kind), hw)?;
                ops::rms_norm_in_place(x, hw, hp.rms_eps);
            }
        }

        // RoPE on every query and key head, each row at its own sequence's position.
        let rope = self.rope_of(layer);
        let n_rot = rope.n_rot();
        let cs = grow(&mut s.rope_cs, n * n_rot)?;
        let positions = seqs
            .iter()
            .zip(rows)
            .flat_map(|(seq, &r)| seq.pos()..seq.pos() + r);
        for (c, p) in cs.chunks_exact_mut(n_rot).zip(positions) {
            rope.cos_sin(p, c);
        }
        for (i, c) in cs.chunks_exact(n_rot).enumerate() {
            for head in q[i * qd..(i + 1) * qd].chunks_exact_mut(hp.head_dim) {
                rope.apply(head, c);
            }
            for head in k[i * kd..(i + 1) * kd].chunks_exact_mut(hp.head_dim) {
                rope.apply(head, c);
            }
        }
        let attn = grow(&mut s.attn, n * hp.n_head * hp.head_dim_v)?;
        let mut first = 0;
        for (seq, &r) in seqs.iter_mut().zip(rows) {
            let pos0 = seq.pos();
            seq.kv.store(
                layer,
                pos0,
                &k[first * kd..(first + r) * kd],
                &v[first * vd..(first + r) * vd],
                r,
            )?;
            let width = hp.n_head * hp.head_dim_v;
            self.attention(
                layer,
                seq,
                &q[first * qd..(first + r) * qd],
                pos0,
                &mut s.scores,
                &mut s.heads,
                &mut attn[first * width..(first + r) * width],
            )?;
            first += r;
        }

        let proj = grow(&mut s.proj, n * d)?;
        let attn = &s.attn[..n * hp.n_head * hp.head_dim_v];
        ops::linear(&w.wo, &name(K::AttnOutput), attn, n, proj, prec)?;
        if let Some(pn) = &w.attn_post_norm {
            let norm_w = grow(&mut s.norm_w, d)?;
            ops::dequantize(pn, &name(K::AttnPostNorm), norm_w)?;
            ops::rms_norm_in_place(proj, norm_w, hp.rms_eps);
        }
        ops::add_assign(hidden, proj);

        // --- feed-forward (SwiGLU or GeGLU; a mixture of experts where the layer has a router)
        let norm_w = grow(&mut s.norm_w, d)?;
        ops::dequantize(&w.ffn_norm, &name(K::FfnNorm), norm_w)?;
        let xn = grow(&mut s.xn, n * d)?;
        ops::rms_norm(hidden, norm_w, hp.rms_eps, xn);
        let proj = grow(&mut s.proj, n * d)?;
        if let (Some(router), Some(moe)) = (&w.router, &hp.moe) {
            let experts = MoeWeights {
                router,
                gate: &w.w_gate,
                up: &w.w_up,
                down: &w.w_down,
            };
            let act = hp.arch.ffn_activation();
            moe_ffn(moe, act, layer, &experts, xn, n, proj, prec)?;
        } else {
            let gate = grow(&mut s.gate, n * hp.n_ff)?;
            let up = grow(&mut s.up, n * hp.n_ff)?;
            let (ng, nu) = (name(K::FfnGate), name(K::FfnUp));
            ops::linear_fused(
                &[(&w.w_gate, &ng), (&w.w_up, &nu)],
                xn,
                n,
                &mut [&mut *gate, &mut *up],
                prec,
            )?;
            match hp.arch.ffn_activation() {
                FfnActivation::Silu => ops::swiglu(gate, up),
                FfnActivation::GeluTanh => ops::geglu_tanh(gate, up),
            }
            ops::linear(&w.w_down, &name(K::FfnDown), gate, n, proj, prec)?;
        }
        if let Some(pn) = &w.ffn_post_norm {
            let norm_w = grow(&mut s.norm_w, d)?;
            ops::dequantize(pn, &name(K::FfnPostNorm), norm_w)?;
            ops::rms_norm_in_place(proj, norm_w, hp.rms_eps);
        }
        ops::add_assign(hidden, proj);
        Ok(())
    }

    /// Causal attention of one sequence's new queries `q` (`[n, q_dim]`, RoPE applied, at
    /// positions `pos0 ..`) over its cache, heads in parallel; writes `[n, n_head * head_dim_v]`
    /// into `attn`. `scores` and `heads` are scratch space.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        seq: &Sequence,
        q: &[f32],
        pos0: usize,
        scores: &mut Vec<f32>,
        heads: &mut Vec<f32>,
        attn: &mut [f32],
    ) -> Result<(), ModelError> {
        let hp = &self.hp;
        let (hd, hdv, nh) = (hp.head_dim, hp.head_dim_v, hp.n_head);
        let qd = hp.q_dim();
        let n = q.len() / qd;
        let ctx = seq.ctx();
        let gqa = hp.gqa();
        let (scale, window, softcap) = (hp.attn_scale, hp.local_window(layer), hp.attn_softcap);
        let (pool, table) = seq.kv.reader();
        let pool = &*pool;
        grow(scores, nh * ctx)?;
        grow(heads, nh * n * hdv)?;
        heads[..nh * n * hdv]
            .par_chunks_mut(n * hdv)
            .zip(scores[..nh * ctx].par_chunks_mut(ctx))
            .enumerate()
            .for_each(|(h, (out, scores))| {
                // Each cached row is used by all n queries: gather the head's rows (from the
                // blocks of the table, converted from f16) once, into this thread's buffers.
                KV_F32.with(|cell| {
                    let mut own = (Vec::new(), Vec::new());
                    let mut guard = cell.try_borrow_mut();
                    let (kb, vb) = match guard.as_deref_mut() {
                        Ok(bufs) => bufs,
                        // Re-entered (a nested parallel caller): private buffers.
                        Err(_) => &mut own,
                    };
                    let (keys, vals) = pool.gather(table, layer, h / gqa, pos0 + n, kb, vb);
                    let head = ops::AttnHead {
                        q: &q[h * hd..],
                        q_stride: qd,
                        hd,
                        hdv,
                        pos0,
                        scale,
                        window,
                        softcap,
                        keys,
                        vals,
                    };
                    ops::attend(&head, scores, out);
                });
            });
        for h in 0..nh {
            for i in 0..n {
                attn[i * nh * hdv + h * hdv..i * nh * hdv + (h + 1) * hdv]
                    .copy_from_slice(&heads[(h * n + i) * hdv..(h * n + i + 1) * hdv]);
            }
        }
        Ok(())
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
