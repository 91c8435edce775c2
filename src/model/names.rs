//! Tensor names and metadata keys of the llama family, from enums and one formatter each,
//! so no name string is scattered around the code base (llama.cpp's `llama-arch` does the same).

use std::fmt;

/// The role of a tensor in a llama-family model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorKind {
    TokenEmbd,
    OutputNorm,
    Output,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnQBias,
    AttnKBias,
    AttnVBias,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3), `[head_dim]`.
    AttnQNorm,
    AttnKNorm,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    AttnPostNorm,
    /// RMSNorm of the feed-forward output before the residual add (Gemma 3).
    FfnPostNorm,
    /// Per-dimension RoPE frequency divisors (Llama 3.1 long-context scaling).
    RopeFreqs,
    /// Q, K and V in one matrix, their rows in that order (Phi-3), `[d, q + k + v]`.
    AttnQkv,
    /// MoE router: one logit per expert, `[d, n_expert]`.
    FfnGateInp,
    /// Expert FFNs, one matrix per expert stacked along the last dimension:
    /// `[d, n_ff_exp, n_expert]` (gate, up) and `[n_ff_exp, d, n_expert]` (down).
    FfnGateExps,
    FfnUpExps,
    FfnDownExps,
    /// Qwen2-MoE's shared expert: its sigmoid gate `[d]` (one logit per token) and its FFN
    /// `[d, n_ff_shexp]` (gate, up), `[n_ff_shexp, d]` (down).
    FfnGateInpShexp,
    FfnGateShexp,
    FfnUpShexp,
    FfnDownShexp,
    /// LongRoPE frequency divisors `[n_rot / 2]` (the 128k-context Phi-3 / Phi-3.5 models):
    /// long ones when a sequence's context passes `rope.scaling.original_context_length`,
    /// short ones within it.
    RopeFactorsLong,
    RopeFactorsShort,
}

impl TensorKind {
    /// Per-layer kinds in the order llama.cpp's converters write them.
    pub const LAYER: [TensorKind; 9] = [
        Self::AttnNorm,
        Self::AttnQ,
        Self::AttnK,
        Self::AttnV,
        Self::AttnOutput,
        Self::FfnNorm,
        Self::FfnGate,
        Self::FfnUp,
        Self::FfnDown,
    ];

    fn stem(self) -> &'static str {
        match self {
            Self::TokenEmbd => "token_embd",
            Self::OutputNorm => "output_norm",
            Self::Output => "output",
            Self::AttnNorm => "attn_norm",
            Self::AttnQ | Self::AttnQBias => "attn_q",
            Self::AttnK | Self::AttnKBias => "attn_k",
            Self::AttnV | Self::AttnVBias => "attn_v",
            Self::AttnOutput => "attn_output",
            Self::FfnNorm => "ffn_norm",
            Self::FfnGate => "ffn_gate",
            Self::FfnUp => "ffn_up",
            Self::FfnDown => "ffn_down",
            Self::AttnQNorm => "attn_q_norm",
            Self::AttnKNorm => "attn_k_norm",
            Self::AttnPostNorm => "post_attention_norm",
            Self::FfnPostNorm => "post_ffw_norm",
            Self::RopeFreqs => "rope_freqs",
            Self::AttnQkv => "attn_qkv",
            Self::FfnGateInp => "ffn_gate_inp",
            Self::FfnGateExps => "ffn_gate_exps",
            Self::FfnUpExps => "ffn_up_exps",
            Self::FfnDownExps => "ffn_down_exps",
            Self::FfnGateInpShexp => "ffn_gate_inp_shexp",
            Self::FfnGateShexp => "ffn_gate_shexp",
            Self::FfnUpShexp => "ffn_up_shexp",
            Self::FfnDownShexp => "ffn_down_shexp",
            Self::RopeFactorsLong => "rope_factors_long",
            Self::RopeFactorsShort => "rope_factors_short",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::AttnQBias | Self::AttnKBias | Self::AttnVBias => "bias",
            _ => "weight",
        }
    }

    pub fn is_global(self) -> bool {
        matches!(
            self,
            Self::TokenEmbd
                | Self::OutputNorm
                | Self::Output
                | Self::RopeFreqs
                | Self::RopeFactorsLong
                | Self::RopeFactorsShort
        )
    }
}

/// `tensor_name(TensorKind::AttnQ, Some(3))` is `"blk.3.attn_q.weight"`; global tensors take `None`.
pub fn tensor_name(kind: TensorKind, layer: Option<usize>) -> String {
    match layer {
        Some(l) if !kind.is_global() => format!("blk.{l}.{}.{}", kind.stem(), kind.suffix()),
        _ => format!("{}.{}", kind.stem(), kind.suffix()),
    }
}

/// A tensor's identity, formatted into its name only when shown (errors), so the forward pass
/// can label every op without allocating per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorId {
    pub kind: TensorKind,
    pub layer: Option<usize>,
}

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&tensor_name(self.kind, self.layer))
    }
}

/// Hyper-parameter keys, prefixed by the architecture name (`llama.block_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKey {
    ContextLength,
    EmbeddingLength,
    BlockCount,
    FeedForwardLength,
    HeadCount,
    HeadCountKv,
    RmsEps,
    RopeFreqBase,
    RopeDimensionCount,
    RopeScalingType,
    RopeScalingFactor,
    RopeScalingOrigCtx,
    RopeScalingAttnFactor,
    VocabSize,
    KeyLength,
    ValueLength,
    SlidingWindow,
    SlidingWindowPattern,
    RopeFreqBaseSwa,
    AttnLogitSoftcap,
    FinalLogitSoftcap,
    /// How an embedding model pools its hidden states (llama.cpp's `pooling_type`).
    PoolingType,
    /// Mixture of experts: experts per layer, experts each token uses, one expert's FFN width.
    ExpertCount,
    ExpertUsedCount,
    ExpertFeedForwardLength,
    ExpertSharedFeedForwardLength,
}

impl ArchKey {
    fn suffix(self) -> &'static str {
        match self {
            Self::ContextLength => "context_length",
            Self::EmbeddingLength => "embedding_length",
            Self::BlockCount => "block_count",
            Self::FeedForwardLength => "feed_forward_length",
            Self::HeadCount => "attention.head_count",
            Self::HeadCountKv => "attention.head_count_kv",
            Self::RmsEps => "attention.layer_norm_rms_epsilon",
            Self::RopeFreqBase => "rope.freq_base",
            Self::RopeDimensionCount => "rope.dimension_count",
            Self::RopeScalingType => "rope.scaling.type",
            Self::RopeScalingFactor => "rope.scaling.factor",
            Self::RopeScalingOrigCtx => "rope.scaling.original_context_length",
            Self::RopeScalingAttnFactor => "rope.scaling.attn_factor",
            Self::VocabSize => "vocab_size",
            Self::KeyLength => "attention.key_length",
            Self::ValueLength => "attention.value_length",
            Self::SlidingWindow => "attention.sliding_window",
            Self::SlidingWindowPattern => "attention.sliding_window_pattern",
            Self::RopeFreqBaseSwa => "rope.freq_base_swa",
            Self::AttnLogitSoftcap => "attn_logit_softcapping",
            Self::FinalLogitSoftcap => "final_logit_softcapping",
            Self::PoolingType => "pooling_type",
            Self::ExpertCount => "expert_count",
            Self::ExpertUsedCount => "expert_used_count",
            Self::ExpertFeedForwardLength => "expert_feed_forward_length",
            Self::ExpertSharedFeedForwardLength => "expert_shared_feed_forward_length",
        }
    }
}

/// `arch_key("llama", ArchKey::BlockCount)` is `"llama.block_count"`.
pub fn arch_key(arch: &str, key: ArchKey) -> String {
    format!("{arch}.{}", key.suffix())
}

/// Architecture-independent metadata keys.
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const TOK_MODEL: &str = "tokenizer.ggml.model";
    pub const TOK_PRE: &str = "tokenizer.ggml.pre";
    pub const TOK_TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOK_SCORES: &str = "tokenizer.ggml.scores";
    pub const TOK_TYPES: &str = "tokenizer.ggml.token_type";
    pub const TOK_MERGES: &str = "tokenizer.ggml.merges";
    pub const TOK_BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const TOK_EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const TOK_UNK: &str = "tokenizer.ggml.unknown_token_id";
    pub const TOK_PAD: &str = "tokenizer.ggml.padding_token_id";
    pub const TOK_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const TOK_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const TOK_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

impl fmt::Display for TensorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.stem(), self.suffix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            tensor_name(TensorKind::AttnQ, Some(3)),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            tensor_name(TensorKind::AttnKBias, Some(0)),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            tensor_name(TensorKind::TokenEmbd, None),
            "token_embd.weight"
        );
        assert_eq!(
            tensor_name(TensorKind::FfnPostNorm, Some(2)),
            "blk.2.post_ffw_norm.weight"
        );
        assert_eq!(
            tensor_name(TensorKind::FfnDownExps, Some(1)),
            "blk.1.ffn_down_exps.weight"
        );
        assert_eq!(
            tensor_name(TensorKind::RopeFactorsLong, Some(0)),
            "rope_factors_long.weight"
        );
        assert_eq!(
            arch_key("qwen3moe", ArchKey::ExpertUsedCount),
            "qwen3moe.expert_used_count"
        );
        assert_eq!(
            arch_key("gemma3", ArchKey::RopeFreqBaseSwa),
            "gemma3.rope.freq_base_swa"
        );
        assert_eq!(
            arch_key("llama", ArchKey::HeadCountKv),
            "llama.attention.head_count_kv"
        );
    }
}
