#!/usr/bin/env python3
"""Writes small seed inputs for the `fuzz_parse` target (fuzz/corpus/fuzz_parse/) with the `gguf`
Python package, so the fuzzer starts from well-formed files and mutates into every section.

Usage: python3 scripts/gguf_fuzz_seeds.py [MODEL.gguf] [--out DIR]

Seeds:
- smollm2_mini.gguf: every metadata key of the real model (arrays cut to 8 entries) and a
  2-layer llama tensor set with tiny shapes in F32/F16/Q4_0/Q8_0/Q4_K;
- all_types.gguf: one key of each of the 13 value types, nested arrays, alignment 8 (gguf-py
  refuses to write empty arrays);
- empty.gguf: no keys, no tensors.
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES


def raw_tensor(w, name, cols, rows, qtype, rng):
    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = rows * cols // block * size
    data = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        w.add_tensor(name, rng.standard_normal((rows, cols)).astype(dtype))
    else:
        w.add_tensor(name, data.reshape(rows, cols // block * size), raw_dtype=qtype)


def smollm2_mini(model, out):
    rng = np.random.default_rng(1)
    w = GGUFWriter(out, "llama")
    if model and os.path.exists(model):
        r = GGUFReader(model)
        for k, f in list(r.fields.items())[3:]:
            if k == "general.architecture":
                continue
            t = GGUFValueType(int(f.parts[2][0]))
            if t == GGUFValueType.ARRAY:
                sub = f.types[-1]
                w.add_key_value(k, f.contents()[:8], t, sub_type=sub)
            else:
                w.add_key_value(k, f.contents(), t)
    types = [Q.F32, Q.F16, Q.Q4_0, Q.Q8_0, Q.Q4_K]
    raw_tensor(w, "token_embd.weight", 256, 8, Q.Q8_0, rng)
    for layer in range(2):
        for i, stem in enumerate(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]):
            raw_tensor(w, f"blk.{layer}.{stem}.weight", 256, 2, types[(i + layer) % len(types)], rng)
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(256, dtype=np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(256, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_types(out):
    w = GGUFWriter(out, "llama")
    V = GGUFValueType
    w.add_key_value("general.alignment", 8, V.UINT32)
    w.add_key_value("t.u8", 200, V.UINT8)
    w.add_key_value("t.i8", -5, V.INT8)
    w.add_key_value("t.u16", 65000, V.UINT16)
    w.add_key_value("t.i16", -300, V.INT16)
    w.add_key_value("t.u32", 4000000000, V.UINT32)
    w.add_key_value("t.i32", -70000, V.INT32)
    w.add_key_value("t.f32", 1.5, V.FLOAT32)
    w.add_key_value("t.bool", True, V.BOOL)
    w.add_key_value("t.string", "héllo", V.STRING)
    w.add_key_value("t.u64", 1 << 40, V.UINT64)
    w.add_key_value("t.i64", -(1 << 40), V.INT64)
    w.add_key_value("t.f64", 2.25, V.FLOAT64)
    w.add_key_value("t.arr_i32", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("t.arr_str", ["a", "", "ccc"], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("t.arr_nested", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
    w.add_tensor("x", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def empty(out):
    w = GGUFWriter(out, "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="fuzz/corpus/fuzz_parse")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    smollm2_mini(a.model, os.path.join(a.out, "smollm2_mini.gguf"))
    all_types(os.path.join(a.out, "all_types.gguf"))
    empty(os.path.join(a.out, "empty.gguf"))
    for f in sorted(os.listdir(a.out)):
        print(f, os.path.getsize(os.path.join(a.out, f)))


if __name__ == "__main__":
    main()
