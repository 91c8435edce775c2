#!/usr/bin/env python3
"""Checks that the `gguf` Python package reads a file written by ROCmForge's GgufWriter exactly
as ROCmForge says it wrote it.

Usage: python3 scripts/gguf_check_roundtrip.py FILE.gguf EXPECTED.json

EXPECTED.json is the canonical dump (see gguf_dump_metadata.py) that tests/gguf_python.rs
computes from our own reader, including per-tensor sha256. Exits 0 when gguf-py reads the same
header, metadata (types, values, order), tensor infos and tensor bytes; exits 1 listing the
differences; exits 2 when the gguf package is missing.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import gguf_dump_metadata as dumper
except ImportError as e:  # numpy or gguf missing
    print(f"cannot import the gguf Python package ({e}); run: pip install gguf", file=sys.stderr)
    sys.exit(2)

COMPARED = ["version", "tensor_count", "kv_count", "alignment", "data_offset", "metadata", "tensors"]


def diff(path, a, b, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'gguf-py' if k in a else 'expected'}")
            else:
                diff(f"{path}.{k}", a[k], b[k], out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} (gguf-py) vs {len(b)} (expected)")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(f"{path}[{i}]", x, y, out)
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: gguf-py {a!r} vs expected {b!r}")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    path, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path, encoding="utf-8") as f:
        expected = json.load(f)
    try:
        got = dumper.dump(path, expected["summary_len"], tensor_data=True)
    except Exception as e:
        print(f"gguf-py failed to read {path}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    problems = []
    for k in COMPARED:
        diff(k, got.get(k), expected.get(k), problems)
    if problems:
        print(f"{path}: {len(problems)} difference(s) between gguf-py and ROCmForge:", file=sys.stderr)
        for p in problems[:50]:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    print(f"{path}: gguf-py agrees ({expected['kv_count']} keys, {expected['tensor_count']} tensors)")


if __name__ == "__main__":
    main()
