#!/usr/bin/env python3
"""Dump a GGUF file's header, metadata and tensor infos as read by the `gguf` Python package
(llama.cpp's gguf-py), in a canonical JSON form that tests/gguf_*.rs reproduce from our reader.

Usage:
    python3 scripts/gguf_dump_metadata.py MODEL.gguf [--out FILE] [--tensor-data]

Canonical form (shared with tests/gguf_support/mod.rs; change both together):
- integers, bools and strings are JSON values; f32/f64 are their IEEE bit patterns as unsigned
  integers (so the comparison is exact and independent of float printing);
- an array is a JSON list of canonical elements (arrays of arrays nest);
- each key becomes {"key", "type", "value"} where type is "u32", "string", "array[i32]", ...;
  arrays longer than SUMMARY_LEN entries become {"key", "type", "len", "sha256"} where sha256 is
  over the UTF-8 of the compact JSON of the canonical list (separators "," and ":", non-ASCII
  kept as is) so the committed file stays small;
- tensors: name, type (ggml name), shape (ggml order, shape[0] contiguous), data-relative offset,
  byte count, and with --tensor-data the sha256 of the tensor bytes.

Requires `pip install gguf`.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType

SUMMARY_LEN = 16

TYPE_NAMES = {
    GGUFValueType.UINT8: "u8",
    GGUFValueType.INT8: "i8",
    GGUFValueType.UINT16: "u16",
    GGUFValueType.INT16: "i16",
    GGUFValueType.UINT32: "u32",
    GGUFValueType.INT32: "i32",
    GGUFValueType.FLOAT32: "f32",
    GGUFValueType.BOOL: "bool",
    GGUFValueType.STRING: "string",
    GGUFValueType.ARRAY: "array",
    GGUFValueType.UINT64: "u64",
    GGUFValueType.INT64: "i64",
    GGUFValueType.FLOAT64: "f64",
}


def canonical_json(v):
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _decode(parts, i, vtype):
    """Decodes one value of type `vtype` from the reader's raw parts starting at index i.

    gguf-py flattens nested arrays in `contents()`, so we walk its parts ourselves: a string is
    [len, bytes], a scalar is [value], an array is [elem_type, len, elements...]. Returns the
    canonical value and the index after it."""
    vtype = GGUFValueType(int(vtype))
    if vtype == GGUFValueType.STRING:
        return str(parts[i + 1].tobytes(), encoding="utf-8"), i + 2
    if vtype == GGUFValueType.ARRAY:
        elem = GGUFValueType(int(parts[i][0]))
        n = int(parts[i + 1][0])
        i += 2
        out = []
        for _ in range(n):
            v, i = _decode(parts, i, elem)
            out.append(v)
        return out, i
    p = parts[i]
    if vtype == GGUFValueType.FLOAT32:
        return int(p.view(np.uint32)[0]), i + 1
    if vtype == GGUFValueType.FLOAT64:
        return int(p.view(np.uint64)[0]), i + 1
    if vtype == GGUFValueType.BOOL:
        return bool(p[0]), i + 1
    return int(p[0]), i + 1


def field_entry(key, field, summary_len=SUMMARY_LEN):
    vtype = GGUFValueType(int(field.parts[2][0]))
    value, end = _decode(field.parts, 3, vtype)
    assert end == len(field.parts), f"{key}: {len(field.parts) - end} parts left over"
    if vtype == GGUFValueType.ARRAY:
        tname = "array[" + TYPE_NAMES[GGUFValueType(int(field.parts[3][0]))] + "]"
    else:
        tname = TYPE_NAMES[vtype]
    entry = {"key": key, "type": tname}
    if isinstance(value, list) and len(value) > summary_len:
        entry["len"] = len(value)
        entry["sha256"] = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
    else:
        entry["value"] = value
    return entry


def dump(path, summary_len=SUMMARY_LEN, tensor_data=False):
    r = GGUFReader(path)
    fields = list(r.fields.items())
    header = {k: int(f.parts[-1][0]) for k, f in fields[:3]}
    meta = [field_entry(k, f, summary_len) for k, f in fields[3:]]
    tensors = []
    for t in r.tensors:
        e = {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "offset": int(t.data_offset - r.data_offset),
            "n_bytes": int(t.n_bytes),
        }
        if tensor_data:
            e["sha256"] = hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
        tensors.append(e)
    import gguf

    return {
        "file": os.path.basename(path),
        "reader": "gguf-py " + getattr(gguf, "__version__", _pkg_version()),
        "summary_len": summary_len,
        "version": header["GGUF.version"],
        "tensor_count": header["GGUF.tensor_count"],
        "kv_count": header["GGUF.kv_count"],
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata": meta,
        "tensors": tensors,
    }


def _pkg_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover - only for the provenance string
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", help="write here instead of stdout")
    ap.add_argument("--summary-len", type=int, default=SUMMARY_LEN)
    ap.add_argument("--tensor-data", action="store_true", help="add sha256 of each tensor's bytes")
    a = ap.parse_args()
    d = dump(a.model, a.summary_len, a.tensor_data)
    text = json.dumps(d, indent=1, ensure_ascii=False) + "\n"
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
