//! Hyper-parameters of a llama-family model, read and checked once from GGUF metadata.

use super::error::ModelError;
use super::names::{arch_key, ArchKey};
use crate::gguf::Metadata;
use serde::Serialize;

/// Architectures the forward pass implements. They share one graph and differ in details
/// (RoPE layout, qkv bias, QK-norm, Gemma's extra norms and GeGLU, Phi-3's fused tensors,
/// Qwen3-MoE's experts), which `Arch` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
    Qwen3Moe,
    /// Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (QKV biases), routed experts plus one shared
    /// expert behind a sigmoid gate.
    Qwen2Moe,
}

/// The gated activation of the feed-forward block: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FfnActivation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "gemma3" => Ok(Self::Gemma3),
            "phi3" => Ok(Self::Phi3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            "qwen2moe" => Ok(Self::Qwen2Moe),
            other => Err(ModelError::UnsupportedArchitecture {
                arch: other.to_string(),
            }),
        }
    }

    /// The metadata prefix (`llama.block_count`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Qwen2Moe => "qwen2moe",
        }
    }

    /// Q, K and V stored as one matrix `attn_qkv` and gate/up as one `ffn_up` of twice the
    /// FFN width, gate rows first (Phi-3).
    pub fn has_fused_projections(self) -> bool {
        matches!(self, Self::Phi3)
    }

    /// Whether every block's FFN is a mixture of experts (`expert_count` experts, the router
    /// `ffn_gate_inp`, the experts in 3-D `ffn_*_exps` tensors) by architecture; a `llama`
    /// file is one when it says so (Mixtral): `HParams::moe` answers for a file.
    pub fn is_moe(self) -> bool {
        matches!(self, Self::Qwen3Moe | Self::Qwen2Moe)
    }

    /// Llama's converters permute Q/K so that adjacent pairs rotate together; Qwen2 keeps the
    /// Hugging Face layout, where element i pairs with i + n_rot/2 (GPT-NeoX style).
    pub fn rope_layout(self) -> RopeLayout {
        match self {
            Self::Llama | Self::Mistral => RopeLayout::Normal,
            Self::Qwen2
            | Self::Qwen3
            | Self::Gemma3
            | Self::Phi3
            | Self::Qwen3Moe
            | Self::Qwen2Moe => RopeLayout::NeoX,
        }
    }

    /// Whether Q, K and V projections carry a bias.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2 | Self::Qwen2Moe)
    }

    /// Whether each query and key head is RMS-normalised (`attn_q_norm`, `attn_k_norm`)
    /// before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3 | Self::Qwen3Moe)
    }

    /// Whether the attention and feed-forward outputs are RMS-normalised before their residual
    /// adds (`post_attention_norm`, `post_ffw_norm`).
    pub fn has_post_norms(self) -> bool {
        matches!(self, Self::Gemma3)
    }

    pub fn ffn_activation(self) -> FfnActivation {
        match self {
            Self::Gemma3 => FfnActivation::GeluTanh,
            _ => FfnActivation::Silu,
        }
    }

    /// What of this architecture the plain llama graph (the GPU backends' layer) lacks, named
    /// for a refusal; `None` when that graph computes it fully.
    pub fn beyond_llama_graph(self) -> Option<&'static str> {
        match self {
            Self::Llama
            | Self::Mistral
            | Self::Qwen2
            | Self::Qwen3
            | Self::Gemma3
            | Self::Phi3
            | Self::Qwen3Moe
            | Self::Qwen2Moe => None,
        }
    }
}

/// Gemma-style interleaved attention: most layers attend only to the last `window` positions
/// with their own RoPE base; every `pattern`-th layer is global.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LocalAttention {
    /// A query at position p sees keys at positions `p - window + 1 ..= p`.
    pub window: usize,
    /// Layer l is local unless `l % pattern == pattern - 1` (llama.cpp's convention); 0: every
    /// layer is local (Mistral).
    pub pattern: usize,
    /// RoPE base of the local layers (`rope.freq_base_swa`, 10000 when absent).
    pub rope_freq_base: f32,
}

/// Mixture-of-experts FFN (Qwen3-MoE): a router scores `n_expert` experts per token, the
/// `n_expert_used` best run on it and their outputs are summed with the router's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Moe {
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// One expert's FFN width (`expert_feed_forward_length`; `feed_forward_length` if absent).
    pub n_ff_exp: usize,
    /// Whether the top-k softmax weights are renormalised to sum to 1 (llama.cpp's qwen3moe
    /// and Mixtral graphs always do, its qwen2moe graph never: the converter writes no key).
    pub norm_top_k: bool,
    /// Width of the shared expert every token also runs through, scaled by a sigmoid gate
    /// (`expert_shared_feed_forward_length`, Qwen2-MoE); `None`: no shared expert.
    pub n_ff_shexp: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1).
    Normal,
    /// Pairs (i, i + n_rot/2).
    NeoX,
}

/// RoPE frequency scaling from `rope.scaling.*`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        factor: f32,
    },
    /// YaRN: interpolation for low frequencies, extrapolation for high ones, a ramp between,
    /// plus an attention magnitude correction.
    Yarn {
        factor: f32,
        orig_ctx: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct HParams {
    pub arch: Arch,
    /// The model's trained context length (`context_length`).
    pub n_ctx_train: usize,
    /// Model width d.
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head width of Q and K.
    pub head_dim: usize,
    /// Per-head width of V.
    pub head_dim_v: usize,
    /// Rotated dimensions per head (`rope.dimension_count`, at most `head_dim`).
    pub n_rot: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    pub rope_scaling: RopeScaling,
    /// `rope.scaling.original_context_length` where the file gives it (YaRN reads it into
    /// `rope_scaling`; LongRoPE picks its long factors past it).
    pub rope_orig_ctx: Option<usize>,
    /// `rope.scaling.attn_factor`: LongRoPE's multiplier on cos/sin (1 when absent).
    pub rope_attn_factor: f32,
    /// From `vocab_size` or the tokenizer's token list; checked against `token_embd` at load.
    pub n_vocab: Option<usize>,
    /// Multiplier on attention scores before softmax (`1/sqrt(head_dim)` unless the family
    /// says otherwise).
    pub attn_scale: f32,
    /// Multiplier on embedding rows (Gemma: `sqrt(n_embd)`; 1 elsewhere).
    pub embed_scale: f32,
    /// `cap * tanh(x / cap)` on attention scores (`attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// `cap * tanh(x / cap)` on the output logits (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Sliding-window layers (Gemma 3), `None`: every layer is global.
    pub local_attention: Option<LocalAttention>,
    /// Mixture-of-experts FFN on every layer (`Arch::is_moe`); `None`: dense FFN.
    pub moe: Option<Moe>,
}

fn bad(key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::BadHParam {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Caps that keep a hostile file from sizing allocations (KV cache, scratch) absurdly.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;
const MAX_HEADS: u64 = 4096;
const MAX_EXPERTS: u64 = 4096;

impl TryFrom<&Metadata> for HParams {
    type Error = ModelError;

    fn try_from(md: &Metadata) -> Result<Self, ModelError> {
        let arch = Arch::from_name(md.architecture()?)?;
        let a = arch.name();
        let key = |k| arch_key(a, k);
        let req = |k: ArchKey, cap: u64| -> Result<usize, ModelError> {
            let name = key(k);
            let v = md.require_u64(&name)?;
            if v == 0 || v > cap {
                return Err(bad(&name, format!("{v} is outside 1..={cap}")));
            }
            Ok(v as usize)
        };
        let opt = |k: ArchKey, cap: u64| -> Result<Option<usize>, ModelError> {
            let name = key(k);
            match md.get_u64(&name)? {
                None => Ok(None),
                Some(v) if v == 0 || v > cap => {
                    Err(bad(&name, format!("{v} is outside 1..={cap}")))
                }
                Some(v) => Ok(Some(v as usize)),
            }
        };

        let n_ctx_train = req(ArchKey::ContextLength, 1 << 24)?;
        let n_embd = req(ArchKey::EmbeddingLength, MAX_DIM)?;
        let n_layer = req(ArchKey::BlockCount, MAX_LAYERS)?;
        let n_ff = req(ArchKey::FeedForwardLength, MAX_DIM)?;
        let n_head = req(ArchKey::HeadCount, MAX_HEADS)?;
        let n_head_kv = opt(ArchKey::HeadCountKv, MAX_HEADS)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(bad(
                &key(ArchKey::HeadCountKv),
                format!("{n_head} query heads are not a multiple of {n_head_kv} KV heads"),
            ));
        }
        let default_head_dim = n_embd / n_head;
        let head_dim = opt(ArchKey::KeyLength, MAX_DIM)?.unwrap_or(default_head_dim);
        let head_dim_v = opt(ArchKey::ValueLength, MAX_DIM)?.unwrap_or(default_head_dim);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(
                &key(ArchKey::KeyLength),
                format!("head width {head_dim} must be even and non-zero"),
            ));
        }
        let n_rot = opt(ArchKey::RopeDimensionCount, MAX_DIM)?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(bad(
                &key(ArchKey::RopeDimensionCount),
                format!("{n_rot} must be even and at most the head width {head_dim}"),
            ));
        }
        let rms_eps_key = key(ArchKey::RmsEps);
        let rms_eps = md
            .get_f64(&rms_eps_key)?
            .ok_or_else(|| bad(&rms_eps_key, "missing"))? as f32;
        if !(rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(bad(&rms_eps_key, format!("{rms_eps} is outside (0, 1)")));
        }
        let base_key = key(ArchKey::RopeFreqBase);
        let rope_freq_base = md.get_f64(&base_key)?.unwrap_or(10_000.0) as f32;
        if !(rope_freq_base.is_finite() && rope_freq_base > 1.0) {
            return Err(bad(&base_key, format!("{rope_freq_base} must be > 1")));
        }
        let rope_scaling = rope_scaling(md, a, n_ctx_train)?;
        let orig_key = key(ArchKey::RopeScalingOrigCtx);
        let rope_orig_ctx = match md.get_u64(&orig_key)? {
            Some(0) => return Err(bad(&orig_key, "must be > 0")),
            v => v.map(|v| v.min(MAX_DIM * 16) as usize),
        };
        let attn_factor_key = key(ArchKey::RopeScalingAttnFactor);
        let rope_attn_factor = match md.get_f64(&attn_factor_key)? {
            None => 1.0,
            Some(f) if f.is_finite() && f > 0.0 && f < 100.0 => f as f32,
            Some(f) => return Err(bad(&attn_factor_key, format!("{f} is outside (0, 100)"))),
        };
        let softcap = |k: ArchKey| -> Result<Option<f32>, ModelError> {
            let name = key(k);
            match md.get_f64(&name)? {
                None => Ok(None),
                Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
                Some(c) => Err(bad(&name, format!("{c} must be > 0"))),
            }
        };
        let attn_softcap = softcap(ArchKey::AttnLogitSoftcap)?;
        let final_softcap = softcap(ArchKey::FinalLogitSoftcap)?;
        // 0 is how converters spell "no window" (llama4's MobileLLM variant).
        let window_key = key(ArchKey::SlidingWindow);
        let window = match md.get_u64(&window_key)? {
            None | Some(0) => None,
            Some(w) if w > 1 << 24 => return Err(bad(&window_key, format!("{w} is too large"))),
            Some(w) => Some(w as usize),
        };
        let local_attention = match (arch, window) {
            (_, None) => None,
            (Arch::Gemma3, Some(window)) => {
                // llama.cpp's gemma3 default: five local layers, then one global.
                let pattern = opt(ArchKey::SlidingWindowPattern, MAX_LAYERS)?.unwrap_or(6);
                let base_key = key(ArchKey::RopeFreqBaseSwa);
                let rope_freq_base = md.get_f64(&base_key)?.unwrap_or(10_000.0) as f32;
                if !(rope_freq_base.is_finite() && rope_freq_base > 1.0) {
                    return Err(bad(&base_key, format!("{rope_freq_base} must be > 1")));
                }
                Some(LocalAttention {
                    window,
                    pattern,
                    rope_freq_base,
                })
            }
            // Mistral-style: one window on every layer, the one RoPE base.
            (_, Some(window)) => Some(LocalAttention {
                window,
                pattern: 0,
                rope_freq_base,
            }),
        };
        // Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head) (its query_pre_attn_scalar);
        // every other size, like the other families, by 1/sqrt(head_dim). llama.cpp tells the
        // 27B by its 62 layers, and so do we.
        let attn_scale = if arch == Arch::Gemma3 && n_layer == 62 {
            1.0 / ((n_embd / n_head) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let embed_scale = if arch == Arch::Gemma3 {
            (n_embd as f32).sqrt()
        } else {
            1.0
        };
        let count_key = key(ArchKey::ExpertCount);
        let expert_count = match md.get_u64(&count_key)? {
            // 0 is how some converters spell "dense".
            None | Some(0) => None,
            Some(v) if v > MAX_EXPERTS => {
                return Err(bad(&count_key, format!("{v} is outside 1..={MAX_EXPERTS}")))
            }
            Some(v) => Some(v as usize),
        };
        // Mixtral is a `llama` file with experts (llama.cpp's converter writes it so).
        let moe_allowed = arch.is_moe() || arch == Arch::Llama;
        let moe = match (arch.is_moe(), expert_count) {
            (true, None) => return Err(bad(&count_key, "missing")),
            (_, Some(n_expert)) if moe_allowed => {
                let n_expert_used = req(ArchKey::ExpertUsedCount, n_expert as u64)?;
                let n_ff_exp = opt(ArchKey::ExpertFeedForwardLength, MAX_DIM)?.unwrap_or(n_ff);
                // Only Qwen2-MoE has a shared expert (its key in another family's file is
                // left unread, and its tensors then refused as unused).
                let n_ff_shexp = match arch {
                    Arch::Qwen2Moe => Some(req(ArchKey::ExpertSharedFeedForwardLength, MAX_DIM)?),
                    _ => None,
                };
                Some(Moe {
                    n_expert,
                    n_expert_used,
                    n_ff_exp,
                    // As llama.cpp's graphs: qwen2moe keeps the softmax weights of the chosen
                    // experts as they are, qwen3moe and Mixtral renormalise them.
                    norm_top_k: arch != Arch::Qwen2Moe,
                    n_ff_shexp,
                })
            }
            // Experts in another family's file: refused by name rather than run as the dense
            // model it is not.
            (_, Some(n)) => {
                return Err(ModelError::UnsupportedFeature {
                    arch: a.to_string(),
                    what: format!(
                        "a mixture of {n} experts in a {a} file (supported: qwen3moe, \
                         qwen2moe, and llama files with experts such as Mixtral)"
                    ),
                })
            }
            (_, None) => None,
        };
        let n_vocab = match opt(ArchKey::VocabSize, 1 << 24)? {
            Some(v) => Some(v),
            None => md
                .get_str_array(super::names::keys::TOK_TOKENS)?
                .map(|t| t.len()),
        };
        Ok(Self {
            arch,
            n_ctx_train,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_v,
            n_rot,
            rms_eps,
            rope_freq_base,
            rope_scaling,
            rope_orig_ctx,
            rope_attn_factor,
            n_vocab,
            attn_scale,
            embed_scale,
            attn_softcap,
            final_softcap,
            local_attention,
            moe,
        })
    }
}

fn rope_scaling(md: &Metadata, a: &str, n_ctx_train: usize) -> Result<RopeScaling, ModelError> {
    let type_key = arch_key(a, ArchKey::RopeScalingType);
    let factor_key = arch_key(a, ArchKey::RopeScalingFactor);
    let kind = md.get_str(&type_key)?.unwrap_or("none");
    let factor = md.get_f64(&factor_key)?.map(|f| f as f32);
    let need_factor = || -> Result<f32, ModelError> {
        match factor {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            Some(f) => Err(bad(&factor_key, format!("{f} must be > 0"))),
            None => Err(bad(&factor_key, format!("missing for scaling {kind:?}"))),
        }
    };
    match kind {
        "none" => Ok(RopeScaling::None),
        // A factor of 1 is how some converters spell "no scaling".
        "linear" if need_factor()? == 1.0 => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need_factor()?,
        }),
        "yarn" => {
            let orig_key = arch_key(a, ArchKey::RopeScalingOrigCtx);
            let orig_ctx = md.get_u64(&orig_key)?.map_or(n_ctx_train, |v| v as usize);
            if orig_ctx == 0 {
                return Err(bad(&orig_key, "must be > 0"));
            }
            Ok(RopeScaling::Yarn {
                factor: need_factor()?,
                orig_ctx,
            })
        }
        other => Err(bad(
            &type_key,
            format!("unsupported RoPE scaling {other:?} (supported: none, linear, yarn)"),
        )),
    }
}

impl HParams {
    /// Query heads per KV head (GQA group size).
    pub fn gqa(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn k_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    pub fn v_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }

    /// What of this model the plain llama graph (the GPU backends' layer) lacks, named for a
    /// refusal: the family's extras, a sliding window, soft-capping. `None`: that graph
    /// computes it fully.
    pub fn beyond_llama_graph(&self) -> Option<String> {
        if let Some(what) = self.arch.beyond_llama_graph() {
            return Some(what.to_string());
        }
        // Sliding windows are the attention kernel's `window` (Gemma 3's local layers rotate
        // with their own base there too); the final soft-cap is applied to the logits on the
        // host. Soft-capping inside attention (Gemma 2) is not in the kernel.
        if self.attn_softcap.is_some() {
            return Some("attention logit soft-capping".into());
        }
        None
    }

    /// The sliding window of layer `l`, `None` for a global layer.
    pub fn local_window(&self, l: usize) -> Option<usize> {
        let la = self.local_attention?;
        (la.pattern == 0 || l % la.pattern < la.pattern - 1).then_some(la.window)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::Value;

    /// Minimal metadata of a tiny `arch` model (2 layers, d 64, 4 heads, 2 KV heads).
    pub(crate) fn md(arch: &str) -> Metadata {
        let mut m = Metadata::new();
        m.insert("general.architecture", Value::String(arch.into()));
        for (k, v) in [
            ("context_length", 2048u32),
            ("embedding_length", 64),
            ("block_count", 2),
            ("feed_forward_length", 128),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
        ] {
            m.insert(format!("{arch}.{k}"), Value::U32(v));
        }
        m.insert(
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        );
        m
    }

    #[test]
    fn reads_llama_and_defaults() {
        let h = HParams::try_from(&md("llama")).unwrap();
        assert_eq!((h.head_dim, h.n_rot, h.gqa()), (16, 16, 2));
        assert_eq!(h.rope_freq_base, 10_000.0);
        assert_eq!(h.rope_scaling, RopeScaling::None);
        assert_eq!(h.arch.rope_layout(), RopeLayout::Normal);
        let q = HParams::try_from(&md("qwen2")).unwrap();
        assert_eq!(q.arch.rope_layout(), RopeLayout::NeoX);
        assert!(q.arch.has_qkv_bias());
    }

    #[test]
    fn rejects_unknown_arch_and_missing_keys() {
        let e = HParams::try_from(&md("gpt2")).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedArchitecture { ref arch } if arch == "gpt2"));
        let mut m = md("llama");
        m.insert("llama.attention.head_count_kv", Value::U32(3));
        assert!(matches!(
            HParams::try_from(&m),
            Err(ModelError::BadHParam { .. })
        ));
        let mut m = Metadata::new();
        m.insert("general.architecture", Value::String("llama".into()));
        let e = HParams::try_from(&m).unwrap_err().to_string();
        assert!(e.contains("llama.context_length"), "{e}");
    }

    #[test]
    fn reads_gemma3_local_layers_and_scales() {
        let mut m = md("gemma3");
        m.insert("gemma3.block_count", Value::U32(12));
        m.insert("gemma3.attention.sliding_window", Value::U32(512));
        m.insert("gemma3.final_logit_softcapping", Value::F32(30.0));
        let h = HParams::try_from(&m).unwrap();
        let la = h.local_attention.unwrap();
        assert_eq!(
            (la.window, la.pattern, la.rope_freq_base),
            (512, 6, 10_000.0)
        );
        let global: Vec<usize> = (0..12).filter(|&l| h.local_window(l).is_none()).collect();
        assert_eq!(global, [5, 11]);
        assert_eq!(h.embed_scale, 8.0);
        assert_eq!(h.final_softcap, Some(30.0));
        assert_eq!(h.attn_softcap, None);
        assert!(h.arch.has_qk_norm() && h.arch.has_post_norms());
        assert_eq!(h.arch.ffn_activation(), FfnActivation::GeluTanh);
        // The GPU graph computes Gemma 3 (GeGLU, local RoPE base, the final cap on the host);
        // a cap inside attention (Gemma 2) it refuses by name.
        assert_eq!(h.beyond_llama_graph(), None);
        let mut capped = h.clone();
        capped.attn_softcap = Some(50.0);
        assert!(capped
            .beyond_llama_graph()
            .unwrap()
            .contains("attention logit soft-capping"));
        assert_eq!(
            HParams::try_from(&md("llama"))
                .unwrap()
                .beyond_llama_graph(),
            None
        );
        let q3 = HParams::try_from(&md("qwen3")).unwrap();
        assert!(q3.moe.is_none());
        // The GPU layer applies QK-norm (per-head rows of its norm kernel).
        assert_eq!(q3.beyond_llama_graph(), None);
        // Mistral-style: a window on every layer, with the one RoPE base; 0 means none.
        let mut m = md("mistral");
        m.insert("mistral.attention.sliding_window", Value::U32(512));
        let h = HParams::try_from(&m).unwrap();
        assert!((0..2).all(|l| h.local_window(l) == Some(512)));
        assert_eq!(h.local_attention.unwrap().rope_freq_base, h.rope_freq_base);
        // The GPU attention kernel takes the window.
        assert_eq!(h.beyond_llama_graph(), None);
        m.insert("mistral.attention.sliding_window", Value::U32(0));
        assert!(HParams::try_from(&m).unwrap().local_attention.is_none());
    }

    #[test]
    fn reads_scaling() {
        let mut m = md("llama");
        m.insert("llama.rope.scaling.type", Value::String("yarn".into()));
        m.insert("llama.rope.scaling.factor", Value::F32(4.0));
        m.insert(
            "llama.rope.scaling.original_context_length",
            Value::U32(512),
        );
        let h = HParams::try_from(&m).unwrap();
        assert_eq!(
            h.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                orig_ctx: 512
            }
        );
        m.insert("llama.rope.scaling.type", Value::String("weird".into()));
        assert!(HParams::try_from(&m).is_err());
    }

    #[test]
    fn reads_moe_and_refuses_what_is_not_verified() {
        let mut m = md("qwen3moe");
        assert!(HParams::try_from(&m)
            .unwrap_err()
            .to_string()
            .contains("qwen3moe.expert_count"));
        m.insert("qwen3moe.expert_count", Value::U32(4));
        m.insert("qwen3moe.expert_used_count", Value::U32(5));
        assert!(matches!(
            HParams::try_from(&m),
            Err(ModelError::BadHParam { ref key, .. }) if key == "qwen3moe.expert_used_count"
        ));
        m.insert("qwen3moe.expert_used_count", Value::U32(2));
        m.insert("qwen3moe.expert_feed_forward_length", Value::U32(32));
        let h = HParams::try_from(&m).unwrap();
        let moe = h.moe.unwrap();
        assert_eq!(
            (
                moe.n_expert,
                moe.n_expert_used,
                moe.n_ff_exp,
                moe.norm_top_k
            ),
            (4, 2, 32, true)
        );
        assert!(h.arch.has_qk_norm() && h.arch.is_moe());
        // The GPU layer computes the experts too (router on the device, top-k on the host).
        assert_eq!(h.beyond_llama_graph(), None);
        // Experts in a llama file (Mixtral): a MoE, with the dense width for its experts.
        // In a qwen2 file: refused by name.
        let mut m = md("llama");
        m.insert("llama.expert_count", Value::U32(8));
        m.insert("llama.expert_used_count", Value::U32(2));
        let h = HParams::try_from(&m).unwrap();
        assert_eq!(h.moe.map(|m| (m.n_expert, m.n_ff_exp)), Some((8, 128)));
        assert_eq!(h.beyond_llama_graph(), None);
        m.insert("llama.expert_count", Value::U32(0));
        assert!(HParams::try_from(&m).unwrap().moe.is_none());
        let mut m = md("qwen2");
        m.insert("qwen2.expert_count", Value::U32(8));
        let e = HParams::try_from(&m).unwrap_err().to_string();
        assert!(e.contains("experts in a qwen2 file"), "{e}");
        // Phi-3: NeoX RoPE over the rotated part only, fused tensors (row blocks on the GPU too).
        let mut m = md("phi3");
        m.insert("phi3.rope.dimension_count", Value::U32(8));
        let h = HParams::try_from(&m).unwrap();
        assert_eq!((h.n_rot, h.head_dim), (8, 16));
        assert_eq!(h.arch.rope_layout(), RopeLayout::NeoX);
        assert!(h.arch.has_fused_projections());
        assert_eq!(h.beyond_llama_graph(), None);
    }
}
