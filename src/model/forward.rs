//! The llama-family forward pass on the CPU, layer-granular so a runtime can run each block as
//! soon as its weights are resident: `embed`, `forward_layer` per block, `output`; `forward`
//! chains them over the memory-mapped weights.

use super::error::ModelError;
use super::hparams::{Arch, FfnActivation, HParams};
use super::kv::{grow, Sequence, SequenceConfig};
use super::moe::{moe_ffn, MoeWeights};
use super::names::TensorId;
use super::ops;
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

    /// A new sequence (KV cache + position) for this model.
    pub fn new_sequence(&self, cfg: SequenceConfig) -> Result<Sequence, ModelError> {
        Sequence::new(&self.hp, cfg)
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
        let hp = &self.hp;
        let d = hp.n_embd;
        let n = hidden.len() / d;
        seq.check_room(n)?;
        let pos0 = seq.pos();
        let prec = seq.precision();
        let (qd, kd, vd) = (hp.q_dim(), hp.k_dim(), hp.v_dim());
        let name = |kind| TensorId {
            kind,
            layer: Some(layer),
        };
        use super::names::TensorKind as K;

        // --- attention
        let s = &mut seq.scratch;
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

        // RoPE on every query and key head.
        let rope = self.rope_of(layer);
        let n_rot = rope.n_rot();
        let cs = grow(&mut s.rope_cs, n * n_rot)?;
        for (i, c) in cs.chunks_exact_mut(n_rot).enumerate() {
            rope.cos_sin(pos0 + i, c);
        }
        for (i, c) in cs.chunks_exact(n_rot).enumerate() {
            for head in q[i * qd..(i + 1) * qd].chunks_exact_mut(hp.head_dim) {
                rope.apply(head, c);
            }
            for head in k[i * kd..(i + 1) * kd].chunks_exact_mut(hp.head_dim) {
                rope.apply(head, c);
            }
        }
        for i in 0..n {
            seq.kv.store(
                layer,
                pos0 + i,
                &k[i * kd..(i + 1) * kd],
                &v[i * vd..(i + 1) * vd],
            );
        }
        self.attention(layer, seq, n, pos0)?;

        let s = &mut seq.scratch;
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

    /// Causal attention of the `n` new queries (in `scratch.q`, RoPE applied) over the cache,
    /// heads in parallel; leaves `[n, n_head * head_dim_v]` in `scratch.attn`.
    fn attention(
        &self,
        layer: usize,
        seq: &mut Sequence,
        n: usize,
        pos0: usize,
    ) -> Result<(), ModelError> {
        let hp = &self.hp;
        let (hd, hdv, nh) = (hp.head_dim, hp.head_dim_v, hp.n_head);
        let ctx = seq.ctx();
        let qd = hp.q_dim();
        let gqa = hp.gqa();
        let (scale, window, softcap) = (hp.attn_scale, hp.local_window(layer), hp.attn_softcap);
        let kv = &seq.kv;
        let s = &mut seq.scratch;
        let q = &s.q[..n * qd];
        grow(&mut s.scores, nh * ctx)?;
        grow(&mut s.heads, nh * n * hdv)?;
        s.heads[..nh * n * hdv]
            .par_chunks_mut(n * hdv)
            .zip(s.scores[..nh * ctx].par_chunks_mut(ctx))
            .enumerate()
            .for_each(|(h, (out, scores))| {
                let (keys, vals) = kv.head(layer, h / gqa, pos0 + n);
                // Each cached row is used by all n queries: convert an f16 head once, into
                // this thread's buffers, not once per query.
                KV_F32.with(|cell| {
                    let mut own = (Vec::new(), Vec::new());
                    let mut guard = cell.try_borrow_mut();
                    let (kb, vb) = match guard.as_deref_mut() {
                        Ok(bufs) => bufs,
                        // Re-entered (a nested parallel caller): private buffers.
                        Err(_) => &mut own,
                    };
                    let head = ops::AttnHead {
                        q: &q[h * hd..],
                        q_stride: qd,
                        hd,
                        hdv,
                        pos0,
                        scale,
                        window,
                        softcap,
                        keys: keys.as_f32(kb),
                        vals: vals.as_f32(vb),
                    };
                    ops::attend(&head, scores, out);
                });
            });
        let attn = grow(&mut s.attn, n * nh * hdv)?;
        for h in 0..nh {
            for i in 0..n {
                attn[i * nh * hdv + h * hdv..i * nh * hdv + (h + 1) * hdv]
                    .copy_from_slice(&s.heads[(h * n + i) * hdv..(h * n + i + 1) * hdv]);
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
