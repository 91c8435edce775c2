#!/usr/bin/env python3
"""Reference embeddings for `/v1/embeddings`: a llama-family forward pass in float64 numpy over
the GGUF tensors (read and dequantized by the `gguf` package), independent of ROCmForge's code.

Usage: embedding_reference.py MODEL.gguf '[[ids...], [ids...]]'
Prints a JSON list: per input, its final hidden states (after the output RMS norm) averaged over
the positions and L2-normalized, which is what the server's mean pooling returns.

Covers what SmolLM2 needs (llama: RMS norm, rotary embedding on adjacent pairs as GGUF's
permuted Q/K weights expect, grouped-query causal attention, SiLU-gated MLP); no rope scaling.
"""
import functools
import json
import sys

import numpy as np
import gguf
from gguf.quants import dequantize


def main() -> None:
    path, inputs = sys.argv[1], json.loads(sys.argv[2])
    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields[name]
        return f.parts[f.data[0]][0]

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_layer = int(field(f"{arch}.block_count"))
    n_head = int(field(f"{arch}.attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv"))
    eps = float(field(f"{arch}.attention.layer_norm_rms_epsilon"))
    base = float(field(f"{arch}.rope.freq_base"))
    tensors = {t.name: t for t in r.tensors}

    @functools.cache
    def w(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    emb = tensors["token_embd.weight"]
    out = []
    for ids in inputs:
        x = np.stack([dequantize(emb.data[i : i + 1], emb.tensor_type)[0] for i in ids])
        x = x.astype(np.float64)
        n, d = x.shape
        hd = d // n_head
        pos = np.arange(n)[:, None]
        theta = pos * base ** (-np.arange(0, hd, 2) / hd)  # [n, hd/2]
        cos, sin = np.cos(theta), np.sin(theta)

        def rope(t):  # [n, heads, hd], adjacent pairs
            a, b = t[..., 0::2], t[..., 1::2]
            c, s = cos[:, None, :], sin[:, None, :]
            o = np.empty_like(t)
            o[..., 0::2] = a * c - b * s
            o[..., 1::2] = a * s + b * c
            return o

        mask = np.triu(np.full((n, n), -np.inf), 1)
        for l in range(n_layer):
            p = f"blk.{l}."
            h = rms(x, w(p + "attn_norm.weight"))
            q = rope((h @ w(p + "attn_q.weight").T).reshape(n, n_head, hd))
            k = rope((h @ w(p + "attn_k.weight").T).reshape(n, n_kv, hd))
            v = (h @ w(p + "attn_v.weight").T).reshape(n, n_kv, hd)
            g = n_head // n_kv
            att = np.empty((n, n_head, hd))
            for hh in range(n_head):
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hh] = s @ v[:, hh // g]
            x = x + att.reshape(n, d) @ w(p + "attn_output.weight").T
            h = rms(x, w(p + "ffn_norm.weight"))
            gate = h @ w(p + "ffn_gate.weight").T
            up = h @ w(p + "ffn_up.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w(p + "ffn_down.weight").T
        x = rms(x, w("output_norm.weight"))
        m = x.mean(axis=0)
        out.append((m / np.linalg.norm(m)).tolist())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
