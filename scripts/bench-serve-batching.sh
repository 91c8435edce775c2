#!/usr/bin/env bash
# Continuous batching on the CPU (issue 18): aggregate tokens/s and TTFT at 1 and 8 clients,
# batched (defaults: max-num-seqs 16, max-batch-tokens 512) and one sequence at a time
# (--max-num-seqs 1, the behaviour before batching), same build, back to back.
# Writes docs/results/<date>-cpu-serve-loadgen-{batching,unbatched}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
D=$(date -u +%F)
cargo build --profile test -p rocmforge-actors --example serve_loadgen
BIN=${CARGO_TARGET_DIR:-target}/debug/examples/serve_loadgen
COMMON=(--clients 1,8 --rounds 2 --max-tokens 64)
"$BIN" "$MODEL" "${COMMON[@]}" --max-num-seqs 1 --out "docs/results/$D-cpu-serve-loadgen-unbatched.json"
"$BIN" "$MODEL" "${COMMON[@]}" --out "docs/results/$D-cpu-serve-loadgen-batching.json"
