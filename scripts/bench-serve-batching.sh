#!/usr/bin/env bash
# Continuous batching on the CPU (issue 18): aggregate tokens/s and TTFT at 1 and 8 clients,
# batched (defaults: max-num-seqs 16, max-batch-tokens 512) and one sequence at a time
# (--max-num-seqs 1, the behaviour before batching), same build, in alternating rounds (the
# machine these run on is shared, so one pass says little; compare medians).
# Release build (debug assertions off, as a user runs it).
# Writes docs/results/<date>-cpu-batching/loadgen-{batched,unbatched}-<round>.json and
# summary-loadgen.json (medians over rounds, and the 8-client / 1-client ratio).
# Usage: scripts/bench-serve-batching.sh [MODEL] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-5}
OUT=docs/results/$(date -u +%F)-cpu-batching
mkdir -p "$OUT"
cargo build --release -p rocmforge-actors --example serve_loadgen
BIN=${CARGO_TARGET_DIR:-target}/release/examples/serve_loadgen
COMMON=(--clients 1,8 --rounds 2 --max-tokens 64)
for i in $(seq 1 "$ROUNDS"); do
    "$BIN" "$MODEL" "${COMMON[@]}" --out "$OUT/loadgen-batched-$i.json"
    "$BIN" "$MODEL" "${COMMON[@]}" --max-num-seqs 1 --out "$OUT/loadgen-unbatched-$i.json"
done
python3 scripts/summarize_loadgen.py "$OUT"
