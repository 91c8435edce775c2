#!/usr/bin/env bash
# Continuous batching on the CPU (issue 18): aggregate tokens/s and TTFT at 1 and 8 clients,
# batched (defaults: max-num-seqs 16, max-batch-tokens 512) and one sequence at a time
# (--max-num-seqs 1, the behaviour before batching), same build, in alternating rounds (the
# machine these run on is shared, so one pass says little; compare medians).
# Release build (debug assertions off, as a user runs it).
# Writes docs/results/<date>-cpu-batching/loadgen-{batched,unbatched}-<round>.json and
# summary-loadgen.json (medians over rounds, and the 8-client / 1-client ratio).
# BASE_LOADGEN=path/to/another/build's/serve_loadgen adds that build's batched run to each round
# (mode `base`); AVX2_TOO=1 adds this build capped to the AVX2 kernels (mode `batched-avx2`,
# `ROCMFORGE_CPU_ISA=avx2`); NO_UNBATCHED=1 skips the one-at-a-time run; OUT overrides the
# results directory. The 1-minute load average before each run
# goes to load.jsonl beside the JSON (one object per run).
# Usage: scripts/bench-serve-batching.sh [MODEL] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-5}
OUT=${OUT:-docs/results/$(date -u +%F)-cpu-batching}
mkdir -p "$OUT"
cargo build --release -p rocmforge-actors --example serve_loadgen
BIN=${CARGO_TARGET_DIR:-target}/release/examples/serve_loadgen
COMMON=(--clients 1,8 --rounds 2 --max-tokens 64)
load() { echo "{\"round\": $1, \"mode\": \"$2\", \"load1\": $(cut -d' ' -f1 /proc/loadavg)}" >> "$OUT/load.jsonl"; }
for i in $(seq 1 "$ROUNDS"); do
    load "$i" batched
    "$BIN" "$MODEL" "${COMMON[@]}" --out "$OUT/loadgen-batched-$i.json"
    if [ -n "${BASE_LOADGEN:-}" ]; then
        load "$i" base
        "$BASE_LOADGEN" "$MODEL" "${COMMON[@]}" --out "$OUT/loadgen-base-$i.json"
    fi
    if [ -n "${AVX2_TOO:-}" ]; then
        load "$i" batched-avx2
        ROCMFORGE_CPU_ISA=avx2 "$BIN" "$MODEL" "${COMMON[@]}" --out "$OUT/loadgen-batched-avx2-$i.json"
    fi
    if [ -z "${NO_UNBATCHED:-}" ]; then
        load "$i" unbatched
        "$BIN" "$MODEL" "${COMMON[@]}" --max-num-seqs 1 --out "$OUT/loadgen-unbatched-$i.json"
    fi
done
python3 scripts/summarize_loadgen.py "$OUT"
