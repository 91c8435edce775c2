#!/usr/bin/env python3
"""Writes reference dequantization vectors for ROCmForge's quant tests into tests/data/quant/.

The reference is the `gguf` Python package (`gguf.quants.dequantize`, numpy), independent of
ggml's C code and of ours. Run from the repository root:

    pip install gguf numpy
    python3 scripts/quant_reference.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs (all little-endian):
  random_<TYPE>.bin      raw blocks: random bytes with finite f16 scales, plus edge blocks
                         (zero scale, f16 max, f16 subnormal)
  random_<TYPE>.f32      gguf.quants.dequantize of those blocks, as float32
  smollm2.json           for a few real tensors of the test model: type, shape, a hash of the
                         whole dequantized tensor and a strided sample of its values
Deterministic: numpy Generator PCG64 seeded per type.
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "quant")

# type -> (number of random blocks, byte offsets of f16 scale fields in a block)
TYPES = {
    "F32": (64, []),
    "F16": (64, []),
    "BF16": (64, []),
    "Q4_0": (64, [0]),
    "Q4_1": (64, [0, 2]),
    "Q5_0": (64, [0]),
    "Q5_1": (64, [0, 2]),
    "Q8_0": (64, [0]),
    "Q2_K": (16, [80, 82]),
    "Q3_K": (16, [108]),
    "Q4_K": (16, [0, 2]),
    "Q5_K": (16, [0, 2]),
    "Q6_K": (16, [208]),
    "IQ4_NL": (64, [0]),
}

SAMPLE = 1024  # values kept per real tensor


def tensor_hash(values: np.ndarray) -> str:
    """sum(bits[i] * (2i + 1)) mod 2^64 over the float32 bit patterns: any change to one value
    changes it (the weights are odd, so invertible mod 2^64). Cheap in numpy and in Rust."""
    bits = values.astype(np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    weights = np.arange(bits.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        return "%016x" % int(np.sum(bits * weights, dtype=np.uint64))


def random_blocks(name: str, n_blocks: int, scale_offsets, rng) -> np.ndarray:
    qtype = T[name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if name == "F32":
        vals = rng.standard_normal(n_blocks).astype(np.float32) * np.float32(3.0)
        vals[:4] = [0.0, -0.0, 1e-40, -3.4e38]  # zero, negative zero, subnormal, large
        return vals.view(np.uint8)
    if name == "F16":
        bits = rng.integers(0, 0x10000, n_blocks, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # no Inf/NaN
        bits[:3] = [0x0001, 0x8000, 0x7BFF]  # subnormal, -0, max
        return bits.astype("<u2").view(np.uint8)
    if name == "BF16":
        bits = rng.integers(0, 0x10000, n_blocks, dtype=np.uint16)
        bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits)
        bits[:2] = [0x0001, 0x7F7F]
        return bits.astype("<u2").view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for b in range(n_blocks):
        for off in scale_offsets:
            if b == 0:
                s = 0.0  # zero scale
            elif b == 1:
                s = 65504.0 if off == scale_offsets[0] else -65504.0  # f16 max
            elif b == 2:
                s = 2.0 ** -20  # f16 subnormal
            else:
                s = rng.uniform(-1.0, 1.0) * 2.0 ** rng.integers(-12, 2)
            raw[b, off:off + 2] = np.array([s], dtype="<f2").view(np.uint8)
    return raw.reshape(-1)


def write_random():
    for i, (name, (n_blocks, offsets)) in enumerate(TYPES.items()):
        rng = np.random.Generator(np.random.PCG64(1000 + i))
        raw = random_blocks(name, n_blocks, offsets, rng)
        deq = dequantize(raw, T[name]).astype("<f4").reshape(-1)
        raw.tofile(os.path.join(OUT, f"random_{name}.bin"))
        deq.tofile(os.path.join(OUT, f"random_{name}.f32"))
        print(f"random_{name}: {raw.size} bytes -> {deq.size} values")


def write_model(path: str):
    reader = gguf.GGUFReader(path)
    wanted = {"blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight",
              "blk.0.attn_norm.weight", "output_norm.weight"}
    out = []
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        deq = dequantize(raw, t.tensor_type).astype(np.float32).reshape(-1)
        stride = max(1, deq.size // SAMPLE)
        out.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "elements": int(deq.size),
            "hash": tensor_hash(deq),
            "sample_stride": stride,
            "sample": [float(v) for v in deq[::stride][:SAMPLE]],
        })
        print(f"{t.name}: {t.tensor_type.name} {deq.size} values, hash {out[-1]['hash']}")
    with open(os.path.join(OUT, "smollm2.json"), "w") as f:
        json.dump({"model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "gguf_version": getattr(gguf, "__version__", "0.19.0"),
                   "numpy_version": np.__version__, "tensors": out}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    write_random()
    if os.path.exists(args.model):
        write_model(args.model)
    else:
        print(f"model {args.model} not found: smollm2.json not regenerated", file=sys.stderr)


if __name__ == "__main__":
    main()
