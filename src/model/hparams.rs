//! Hyper-parameters of a llama-family model, read and checked once from GGUF metadata.

use super::error::ModelError;
use super::names::{arch_key, ArchKey};
use crate::gguf::Metadata;
use serde::Serialize;

/// Architectures the forward pass implements. They share one graph and differ in details
/// (RoPE layout, qkv bias), which `Arch` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
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
        }
    }

    /// Llama's converters permute Q/K so that adjacent pairs rotate together; Qwen2 keeps the
    /// Hugging Face layout, where element i pairs with i + n_rot/2 (GPT-NeoX style).
    pub fn rope_layout(self) -> RopeLayout {
        match self {
            Self::Llama | Self::Mistral => RopeLayout::Normal,
            Self::Qwen2 => RopeLayout::NeoX,
        }
    }

    /// Whether Q, K and V projections carry a bias.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
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
    /// From `vocab_size` or the tokenizer's token list; checked against `token_embd` at load.
    pub n_vocab: Option<usize>,
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
            n_vocab,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Value;

    fn md(arch: &str) -> Metadata {
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
}
