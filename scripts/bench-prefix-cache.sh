#!/usr/bin/env bash
# Prefix cache (issue 18): 16 chat requests sharing a ~1,000-token system prompt, sent one after
# another; time to first token of requests 2..16 against the first's (target: at most 25%).
# Each round uses its own system prompt, so no round reuses another's blocks. Release build.
# Writes docs/results/<date>-cpu-batching/prefix-ttft.json.
# Usage: scripts/bench-prefix-cache.sh [MODEL] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-3}
OUT=docs/results/$(date -u +%F)-cpu-batching
mkdir -p "$OUT"
cargo build --release -p rocmforge-actors --example serve_prefix_ttft
BIN=${CARGO_TARGET_DIR:-target}/release/examples/serve_prefix_ttft
"$BIN" "$MODEL" --requests 16 --rounds "$ROUNDS" --out "$OUT/prefix-ttft.json"
