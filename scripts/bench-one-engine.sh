#!/usr/bin/env bash
# The one-engine comparison on the GPU machine (docs/PERFORMANCE.md, "One engine"): the
# runtime (the one engine) of a new build beside a baseline build (whose plain `run`/`bench` may
# still be the old direct CUDA loader), in interleaved rounds on the same 8B-shape models (made here with `synth`).
#
#   bench-one-engine.sh NEW_BIN BASE_BIN TOKENIZER_GGUF [ROUNDS]
#
# TOKENIZER_GGUF: SmolLM2 or a tokenizer-only GGUF (../shared/bench/make-tokenizer-gguf.py).
# Writes one JSON (or text) file per measurement to $OUT and prints a compact log; the first
# round also warms the page cache (its start-up numbers are the warm ones only from round 2).
set -u
NEW=$1 BASE=$2 TOK=$3 ROUNDS=${4:-3}
OUT=${OUT:-./bench-out}
M=${MODELS:-/tmp/rf-models}
QTYPES=${QTYPES:-q4_0}
mkdir -p "$OUT" "$M"
for q in $QTYPES; do
    [ -f "$M/$q.gguf" ] || "$NEW" synth --preset 8b --qtype "$q" --tokenizer-from "$TOK" \
        --out "$M/$q.gguf" > /dev/null
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/card.txt"
cat "$OUT/card.txt"

# Process wall in ms of a command whose output goes to FILE.
wall() {
    local file=$1
    shift
    local s
    s=$(date +%s%N)
    "$@" > "$file" 2>&1
    local rc=$?
    echo "$(( ($(date +%s%N) - s) / 1000000 )) ms (rc $rc)"
}

for r in $(seq "$ROUNDS"); do
    for q in $QTYPES; do
        m="$M/$q.gguf"
        half=$(( $(stat -c %s "$m") / 2 ))
        tag="r$r-$q"
        # Start to first token: one generated token, process wall (warm page cache after round 1).
        echo "$tag ttft new-engine   $(wall "$OUT/$tag-ttft-new-engine.json" "$NEW" run --pipeline --backend cuda -m "$m" --prompt Hello -n 1 --temp 0 --json)"
        echo "$tag ttft base-direct  $(wall "$OUT/$tag-ttft-base-direct.json" "$BASE" run --backend cuda -m "$m" --prompt Hello -n 1 --temp 0 --json)"
        echo "$tag ttft base-engine  $(wall "$OUT/$tag-ttft-base-engine.json" "$BASE" run --pipeline --backend cuda -m "$m" --prompt Hello -n 1 --temp 0 --json)"
        # Throughput, all weights resident.
        echo "$tag bench new-engine  $(wall "$OUT/$tag-bench-new-engine.json" "$NEW" bench --pipeline --backend cuda -m "$m" -p 512 -n 128 -r 3 --json)"
        echo "$tag bench base-direct $(wall "$OUT/$tag-bench-base-direct.json" "$BASE" bench --backend cuda -m "$m" -p 512 -n 128 -r 3 --json)"
        # Half the weights on the GPU: the engine streams the rest; the baseline's direct loader
        # streams through its ring (`--weight-budget`), its engine through the old uploader.
        echo "$tag half new-engine   $(wall "$OUT/$tag-half-new-engine.json" "$NEW" bench --backend cuda -m "$m" --memory-budget 50% -p 512 -n 32 -r 2 --json)"
        echo "$tag half base-direct  $(wall "$OUT/$tag-half-base-direct.json" "$BASE" bench --backend cuda -m "$m" --weight-budget "$half" -p 512 -n 32 -r 2 --json)"
        echo "$tag half base-engine  $(wall "$OUT/$tag-half-base-engine.json" "$BASE" run --pipeline --backend cuda -m "$m" --memory-budget 50% --prompt Hello -n 16 --temp 0 --json)"
    done
done
# One line per file: the numbers that matter, for the log.
python3 - "$OUT" <<'PY'
import json, glob, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "r*.json"))):
    name = os.path.basename(f)[:-5]
    try:
        text = open(f).read().strip().splitlines()
        j = json.loads(text[-1]) if text else None
    except Exception as e:
        print(f"{name}: unreadable ({e})")
        continue
    if isinstance(j, list):
        print(name, " ".join(f"{t['test']}={t['tokens_per_second']:.1f}" for t in j))
    elif isinstance(j, dict) and "tests" in j:
        print(name, f"first_token_ms={j.get('first_token_ms', 0):.0f}", f"load_GBps={j.get('load_gb_per_s', 0):.1f}",
              " ".join(f"{t['test']}={t['tokens_per_second']:.1f}" for t in j["tests"]))
    elif isinstance(j, dict):
        t = j.get("timings", {})
        g = t.get("gen", t)
        print(name, f"first_token_ms={t.get('first_token_ms')}", f"decode_tok_s={g.get('decode_tokens_per_second')}",
              f"peak_resident={j.get('stats', {}).get('peak_resident_bytes')}")
PY
