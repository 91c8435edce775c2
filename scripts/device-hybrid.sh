#!/usr/bin/env bash
# Host layers on the GPU machine: `rocmforge bench --backend cuda` on the 8B-shape `synth` Q4_0
# model at a 50% weight budget with the last N layers computed on the CPU (`--cpu-layers N`),
# N in $CPU_LAYERS, interleaved rounds, medians printed. The build is the one device-check.sh
# extracted (run it first, in the call before, so /tmp/rocmforge-device/bin/rocmforge exists);
# the tokenizer travels beside this script, as for device-ab.sh:
#
# Here:   mkdir -p .device-ab && cp scripts/device-hybrid.sh .device-ab/
#         python3 ../shared/bench/make-tokenizer-gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf .device-ab/tok.gguf
# There:  run carry [".device-ab"] 'bash .device-ab/device-hybrid.sh'   (within 30 s of device-check)
#
# Environment: ROUNDS (default 2), CPU_LAYERS (default "0 4 8 12 16"; `fit` allowed), BUDGET
# (default 50%).
# Writes $OUT/hybrid.jsonl (one object per bench result, with cpu_layers and round).
set -u
W=/tmp/rocmforge-device
BIN=$W/bin/rocmforge
D="$(cd "$(dirname "$0")" && pwd)"
OUT=${OUT:-/tmp/out}
ROUNDS=${ROUNDS:-2}
CPU_LAYERS=${CPU_LAYERS:-0 4 8 12 16}
BUDGET=${BUDGET:-50%}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no $BIN: run device-check.sh in the call before"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/gpu.txt"
M=$W/8b-q4_0.gguf
[ -f "$M" ] || "$BIN" synth --preset 8b --qtype q4_0 --tokenizer-from "$D/tok.gguf" --out "$M" \
    > /dev/null 2>&1 || { echo "synth failed"; exit 1; }
cat "$M" > /dev/null
export ROCMFORGE_KERNEL_CACHE=$W/kernels-ab
"$BIN" bench -m "$M" --backend cuda -p 16 -n 4 -r 1 > /dev/null 2>&1
: > "$OUT/hybrid.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for n in $CPU_LAYERS; do
        "$BIN" bench -m "$M" --backend cuda --memory-budget "$BUDGET" --cpu-layers "$n" \
            -p 512 -n 32 -r 1 --json 2>/dev/null | python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print(json.dumps(dict(r, cpu_layers='$n', budget='$BUDGET', round=$round)))" >> "$OUT/hybrid.jsonl"
    done
done
python3 - "$OUT/hybrid.jsonl" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
for t, n in sorted({(r["test"], str(r["cpu_layers"])) for r in rows}):
    v = [r["tokens_per_second"] for r in rows if (r["test"], str(r["cpu_layers"])) == (t, n)]
    print(t, "cpu_layers", n, "median %.1f" % st.median(v), [round(x, 1) for x in v])
PY
