#!/usr/bin/env python3
"""Tiny random models of each family, their GGUF conversions and transformers' logits, for
tests/tiny_families.rs. By hand, not in CI (needs torch and transformers; see
tests/data/tiny-families/README.md for the versions used).

For each family: a transformers model with small widths and the family's options switched on
(Llama 3 RoPE scaling and an untied head; Qwen2 QKV biases; Qwen3 QK-norm; Gemma 3 QK-norm,
post-norms, GeGLU, sliding-window layers with their own RoPE base, final logit soft-capping;
Phi-3 fused QKV and gate/up, partial rotary, and a second Phi-3 with LongRoPE; Mistral's
sliding window; Qwen3-MoE, Mixtral and
Qwen2-MoE (with its shared expert) with 4 experts, top-2),
every weight drawn at random (biases and norm weights too, so they matter), saved, converted with
llama.cpp's convert_hf_to_gguf.py to F32 and Q8_0, and run by transformers in float32 on a fixed
sequence of random token ids. The logits of every position are saved, once with the f32
weights and once with the Q8_0 round trip of every matrix (the reference of the Q8_0 file).

The converter is run in-process with one change: the models have no tokenizer, so each model
class's `set_vocab` is replaced by a synthetic one (placeholder tokens `<tN>`, SentencePiece
type "llama"). The tensor conversion (names, Q/K permutation, norm shifts, rope_freqs) is the
converter's own.

    /path/to/venv/bin/python scripts/tiny_families.py LLAMA_CPP_DIR [OUT_DIR] [FAMILY ...]

With `--gpu` (before the paths), only the GPU-sized Q8_0 variants in OUT_DIR/gpu/ are made.
With FAMILY names, only those are (re)made and the other entries of OUT_DIR/meta.json are kept
(each family's random weights depend only on its place in the list, so the others' files stay
as they are).

LLAMA_CPP_DIR is the llama.cpp tree vendored in the llama-cpp-python sdist (vendor/llama.cpp).
"""
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 256
N_TOKENS = 24
SEED = 17
# phi3longrope's original context: the long factors apply past it.
LONGROPE_ORIG = 16

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def families():
    return {
        "llama": transformers.LlamaConfig(
            **COMMON,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Small, so the tiny head width has dimensions on both sides of the ramp.
                "original_max_position_embeddings": 32,
            },
        ),
        "qwen2": transformers.Qwen2Config(
            **COMMON,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "qwen3": transformers.Qwen3Config(
            **COMMON,
            num_hidden_layers=2,
            head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "gemma3": transformers.Gemma3TextConfig(
            **COMMON,
            # Six layers: five sliding-window layers, then a global one (the pattern that
            # llama.cpp assumes for gemma3 files).
            num_hidden_layers=6,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "phi3": transformers.Phi3Config(
            **COMMON,
            num_hidden_layers=2,
            # Half of each 16-wide head rotates (Phi-4-mini rotates 3/4).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            original_max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "mistral": transformers.MistralConfig(
            **COMMON,
            num_hidden_layers=2,
            head_dim=16,
            # Window 8 over 24 positions: most queries see only part of the prefix.
            sliding_window=8,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "qwen3moe": transformers.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            # Expert width 32 != d = 64, so a transposed expert tensor cannot pass the shape check.
            moe_intermediate_size=32,
            # llama.cpp's qwen3moe graph always renormalises the top-k weights.
            norm_topk_prob=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        # The converter writes Mixtral as a `llama` file with experts (expert_count and the
        # ffn_*_exps tensors); it always renormalises the top-k weights, as llama.cpp does.
        "mixtral": transformers.MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        # Qwen2 attention (QKV biases) with routed experts and a shared expert behind a
        # sigmoid gate; llama.cpp's qwen2moe graph keeps the top-k softmax weights as they are.
        "qwen2moe": transformers.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        # Phi-3 with LongRoPE (the 128k-context Phi-3 / Phi-3.5 models): per-dimension
        # frequency divisors, long ones when the context passes the original 16 positions,
        # short ones within it, and cos/sin scaled by sqrt(1 + ln(256/16) / ln(16)). The 24
        # reference positions pass 16, so transformers uses the long factors there; a second
        # reference over the first 16 tokens uses the short ones.
        "phi3longrope": transformers.Phi3Config(
            **COMMON,
            num_hidden_layers=2,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": LONGROPE_ORIG,
                "long_factor": [1.0, 2.5, 7.0, 19.0],
                "short_factor": [1.0, 1.3, 1.9, 3.1],
            },
            original_max_position_embeddings=LONGROPE_ORIG,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    }


# GPU-sized variants for the device tests (actors/tests/gpu_forward.rs): heads 32 wide, as
# the GPU attention kernel needs (a multiple of the warp), Q8_0 only and no reference logits:
# the device runs them against the exact CPU, which the small models above tie to transformers.
GPU_FAMILIES = ["llama", "mistral", "qwen2", "phi3", "gemma3", "mixtral", "qwen2moe"]


def gpu_sized(config):
    """`config` with hidden width 128 and four 32-wide heads (FFN 256)."""
    config = copy.deepcopy(config)
    config.hidden_size = 128
    config.intermediate_size = 256
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = 32
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = 32
    return config


def randomize(model: torch.nn.Module, gen: torch.Generator, gemma: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                # Gemma stores w for a (1 + w) scale; the others scale by w itself.
                p.copy_(0.2 * noise if gemma else 1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def q8_0_round_trip(model: torch.nn.Module, keep_f32: set) -> None:
    """Replaces every matrix by its Q8_0 round trip, as gguf-py quantizes it (blocks of 32
    along each row, scale max|x|/127 kept as f16, values rounded half away from zero), so the
    quantized file has a float32 reference of its own. Vectors (norms, biases) stay f32, as the
    converter keeps them, and so do the matrices it keeps f32 (`keep_f32`: a MoE router). A 3-D
    expert tensor `[n_expert, rows, cols]` is blocked along its rows like a stack of matrices."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name in keep_f32:
                continue
            blocks = p.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.sign(blocks * inv) * torch.floor(torch.abs(blocks * inv) + 0.5)
            p.copy_((q * d.half().float()).reshape(p.shape))


def synthetic_vocab(self) -> None:
    import gguf

    n = self.hparams["vocab_size"]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([gguf.TokenType.NORMAL] * n)


def as_mistral(cls):
    """llama.cpp's converter maps MistralForCausalLM to the `llama` architecture and drops the
    sliding window (llama.cpp's llama graph has none). To test a file that says what the model
    does, the tiny mistral's conversion writes `general.architecture = mistral` and
    `mistral.attention.sliding_window` (the GGUF key llama.cpp defines) around the converter's
    own parameters; its tensors (with the llama Q/K permutation) are the converter's."""
    orig = cls.set_gguf_parameters

    def set_gguf_parameters(self):
        self.gguf_writer.arch = "mistral"
        self.gguf_writer.add_architecture()
        orig(self)
        self.gguf_writer.add_sliding_window(self.hparams["sliding_window"])

    return orig, set_gguf_parameters


def convert(llama_cpp: Path, model_dir: Path, out: Path, outtype: str) -> None:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    sys.path.insert(0, str(llama_cpp))
    import convert_hf_to_gguf as conv
    from conversion import get_model_class

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    cls = get_model_class(arch)
    cls.set_vocab = synthetic_vocab
    orig = None
    if arch == "MistralForCausalLM":
        orig, cls.set_gguf_parameters = as_mistral(cls)
    saved = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    try:
        conv.main()
    finally:
        sys.argv = saved
        if orig is not None:
            cls.set_gguf_parameters = orig


def gguf_architecture(llama_cpp: Path, path: Path) -> str:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    return GGUFReader(path).fields["general.architecture"].contents()


def main_gpu(llama_cpp: Path, out: Path) -> None:
    """`OUT/gpu/<family>.q8_0.gguf` for the GPU_FAMILIES (`--gpu`)."""
    gpu = out / "gpu"
    gpu.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/rocmforge-tiny-families-gpu")
    all_families = families()
    for i, family in enumerate(GPU_FAMILIES):
        config = gpu_sized(all_families[family])
        gen = torch.Generator().manual_seed(SEED + 100 + i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        randomize(model, gen, gemma=family.startswith("gemma"))
        model_dir = work / family
        model.save_pretrained(model_dir, safe_serialization=True)
        vocab = {f"<t{i}>": i for i in range(VOCAB)}
        (model_dir / "tokenizer.json").write_text(
            json.dumps({"model": {"vocab": vocab}, "added_tokens": []})
        )
        convert(llama_cpp, model_dir, gpu / f"{family}.q8_0.gguf", "q8_0")


def main() -> None:
    if "--gpu" in sys.argv:
        args = [a for a in sys.argv[1:] if a != "--gpu"]
        main_gpu(Path(args[0]), Path(args[1] if len(args) > 1 else "tests/data/tiny-families"))
        return
    llama_cpp = Path(sys.argv[1])
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data/tiny-families")
    only = set(sys.argv[3:])
    work = Path("/tmp/rocmforge-tiny-families")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (N_TOKENS,), generator=torch.Generator().manual_seed(SEED))
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "tokens": tokens.tolist(),
        "families": {},
    }
    if only and (out / "meta.json").exists():
        meta["families"] = json.loads((out / "meta.json").read_text())["families"]
    for i, (family, config) in enumerate(families().items()):
        if only and family not in only:
            continue
        gen = torch.Generator().manual_seed(SEED + i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        randomize(model, gen, gemma=family.startswith("gemma"))
        model_dir = work / family
        model.save_pretrained(model_dir, safe_serialization=True)
        # The gemma converter counts the real vocabulary in tokenizer.json to trim padding rows
        # of the embedding table: a stand-in listing the placeholder tokens keeps all rows.
        vocab = {f"<t{i}>": i for i in range(VOCAB)}
        (model_dir / "tokenizer.json").write_text(
            json.dumps({"model": {"vocab": vocab}, "added_tokens": []})
        )
        files, refs = {}, {}
        for outtype in ["f32", "q8_0"]:
            name = f"{family}.{outtype}.gguf"
            convert(llama_cpp, model_dir, out / name, outtype)
            files[outtype] = name
            if outtype == "q8_0":
                # The MoE router (`mlp.gate`, GGUF `ffn_gate_inp`) and Qwen2-MoE's shared-expert
                # gate (`ffn_gate_inp_shexp`) stay f32 in the converter.
                kept = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")
                keep = {n for n, _ in model.named_parameters() if n.endswith(kept)}
                q8_0_round_trip(model, keep)
            with torch.no_grad():
                logits = model(tokens[None, :]).logits[0].to(torch.float32).numpy()
            refs[outtype] = f"{family}.{outtype}.logits.f32.bin"
            logits.astype("<f4").tofile(out / refs[outtype])
            if family == "phi3longrope" and outtype == "f32":
                # Within the original context transformers takes the short factors.
                with torch.no_grad():
                    short = model(tokens[None, :LONGROPE_ORIG]).logits[0].to(torch.float32).numpy()
                refs["f32_short"] = f"{family}.f32.short.logits.f32.bin"
                short.astype("<f4").tofile(out / refs["f32_short"])
        meta["families"][family] = {
            "hf_architecture": json.loads((model_dir / "config.json").read_text())["architectures"][0],
            "gguf_architecture": gguf_architecture(llama_cpp, out / files["f32"]),
            "config": {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version",)},
            "gguf": files,
            # transformers' logits with the f32 weights, and with the Q8_0 round trip of them.
            "logits": refs,
            "logits_shape": list(logits.shape),
        }
        print(family, logits.shape, float(np.abs(logits).max()))
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
