#!/usr/bin/env python3
"""Medians over rounds of serve_loadgen JSON files (scripts/bench-serve-batching.sh).

Usage: summarize_loadgen.py DIR  -- reads DIR/loadgen-<mode>-<round>.json for every mode found,
writes DIR/summary-loadgen.json and prints the medians: tokens/s and TTFT p50 per client level,
and the ratio of the 8-client to the 1-client tokens/s (taken per round, then the median).
"""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1]
modes = sorted({re.sub(r"^loadgen-(.*)-\d+\.json$", r"\1", os.path.basename(p))
                for p in glob.glob(f"{out}/loadgen-*-*.json")})
summary = {}
for mode in modes:
    # Exactly this mode's rounds (`batched-*` would also match `batched-avx2-*`).
    mine = re.compile(rf"^loadgen-{re.escape(mode)}-\d+\.json$")
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/loadgen-{mode}-*.json"))
            if mine.match(os.path.basename(p))]
    levels, ratios = {}, []
    for r in runs:
        lv = {l["clients"]: l for l in r["levels"]}
        for c, l in lv.items():
            d = levels.setdefault(str(c), {"tokens_per_s": [], "ttft_p50_ms": []})
            d["tokens_per_s"].append(l["tokens_per_s"])
            d["ttft_p50_ms"].append(l["ttft_p50_ms"])
        if 1 in lv and 8 in lv:
            ratios.append(lv[8]["tokens_per_s"] / lv[1]["tokens_per_s"])
    summary[mode] = {
        "rounds": len(runs),
        "ratio_8_to_1": {"median": statistics.median(ratios), "all": ratios} if ratios else None,
        "levels": {c: {k: {"median": statistics.median(v), "all": v} for k, v in d.items()}
                   for c, d in levels.items()},
    }
with open(f"{out}/summary-loadgen.json", "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
for mode, s in summary.items():
    lv = ", ".join(f"{c} clients {l['tokens_per_s']['median']:.1f} tok/s "
                   f"(TTFT p50 {l['ttft_p50_ms']['median']:.0f} ms)" for c, l in s["levels"].items())
    r = s["ratio_8_to_1"]
    print(f"{out} {mode}: {s['rounds']} rounds; {lv}; 8/1 ratio median "
          f"{r['median']:.2f}" if r else "")
