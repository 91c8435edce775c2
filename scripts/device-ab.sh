#!/usr/bin/env bash
# Same-lease A/B of two builds on the GPU machine, interleaved rounds, medians printed:
# `rocmforge bench --backend cuda` on 8B-shape `synth` models (SmolLM2's tokenizer), full and
# at a 50% memory budget. The new build is the one device-check.sh extracted (run it first, in
# the call before, so the machine is warm and /tmp/rocmforge-device/bin/rocmforge exists); the
# old one travels xz-compressed beside this script.
#
# Here:   mkdir -p .device-ab && cp scripts/device-ab.sh .device-ab/
#         strip -o .device-ab/rocmforge <old build's target/release/rocmforge> && xz .device-ab/rocmforge
#         python3 ../shared/bench/make-tokenizer-gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf .device-ab/tok.gguf
#         (.device-ab is git-ignored: echo /.device-ab/ >> .git/info/exclude)
# There:  run carry [".device-ab"] 'bash .device-ab/device-ab.sh'   (within 30 s of device-check)
#
# Environment: ROUNDS (default 3), QTYPES (default "q4_0 q4_k"), BUDGET_RUNS (default 1: one
# 50%-budget pp512/tg32 run of q4_0 per build and round; 0 skips them), STARTUP_WARM and
# STARTUP_COLD (default 0: start-to-first-token runs of the new build, below), DEPTH (default 0;
# e.g. 4000: also tg128 after DEPTH positions, first qtype, per build and round). Writes $OUT/ab.jsonl
# (one object per bench result, with build, qtype, budget, round).
set -u
W=/tmp/rocmforge-device
NEW=$W/bin/rocmforge
OLD=$W/old/rocmforge
D="$(cd "$(dirname "$0")" && pwd)"
OUT=${OUT:-/tmp/out}
ROUNDS=${ROUNDS:-3}
QTYPES=${QTYPES:-q4_0 q4_k}
BUDGET_RUNS=${BUDGET_RUNS:-1}
mkdir -p "$OUT" "$W/old"
[ -x "$NEW" ] || { echo "no $NEW: run device-check.sh in the call before"; exit 1; }
xz -dc "$D/rocmforge.xz" > "$OLD" && chmod +x "$OLD" || { echo "no $D/rocmforge.xz"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for q in $QTYPES; do
    [ -f "$W/8b-$q.gguf" ] || "$NEW" synth --preset 8b --qtype "$q" --tokenizer-from "$D/tok.gguf" \
        --out "$W/8b-$q.gguf" > /dev/null 2>&1 || { echo "synth $q failed"; exit 1; }
    cat "$W/8b-$q.gguf" > /dev/null
done
export ROCMFORGE_KERNEL_CACHE=$W/kernels-ab
first=${QTYPES%% *}
# Both builds' kernels compiled and cached before the timed rounds.
for b in "$NEW" "$OLD"; do "$b" bench -m "$W/8b-$first.gguf" --backend cuda -p 16 -n 4 -r 1 > /dev/null 2>&1; done
: > "$OUT/ab.jsonl"
run() { # build qtype budget-label bench-args...
    local tag=$1 q=$2 budget=$3 b=$NEW
    shift 3
    [ "$tag" = old ] && b=$OLD
    "$b" bench -m "$W/8b-$q.gguf" --backend cuda "$@" --json 2>/dev/null | python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print(json.dumps(dict(r, build='$tag', qtype='$q', budget='$budget', round=$round)))" >> "$OUT/ab.jsonl"
}
for round in $(seq 1 "$ROUNDS"); do
    for q in $QTYPES; do
        for tag in new old; do run "$tag" "$q" full -p 512 -n 128 -r 2; done
    done
    if [ "$BUDGET_RUNS" != 0 ]; then
        for tag in new old; do run "$tag" "$first" 50% --memory-budget 50% -p 512 -n 32 -r 1; done
    fi
    # Decode after DEPTH positions (issue 16: tg128 at context 4,096), first qtype only.
    if [ "${DEPTH:-0}" != 0 ]; then
        for tag in new old; do run "$tag" "$first" full -p 0 -n 128 -d "$DEPTH" -r 2; done
    fi
done
# Start to first token of the new build (issue 12): process wall of `run -n 1`, warm page
# cache (STARTUP_WARM runs) and cold (STARTUP_COLD runs after dropping the page cache; needs
# root), one line each in $OUT/startup.txt.
wall_ms() { local s rc; s=$(date +%s%N); "$@" > /dev/null 2>&1; rc=$?; echo "$(( ($(date +%s%N) - s) / 1000000 )) rc=$rc"; }
: > "$OUT/startup.txt"
for i in $(seq 1 "${STARTUP_WARM:-0}"); do
    echo "warm run -n 1 q4_0: $(wall_ms "$NEW" run --backend cuda -m "$W/8b-$first.gguf" --prompt Hello -n 1 --temp 0) ms" | tee -a "$OUT/startup.txt"
done
for i in $(seq 1 "${STARTUP_COLD:-0}"); do
    sync; echo 3 > /proc/sys/vm/drop_caches || echo "drop_caches failed" | tee -a "$OUT/startup.txt"
    echo "cold run -n 1 q4_0: $(wall_ms "$NEW" run --backend cuda -m "$W/8b-$first.gguf" --prompt Hello -n 1 --temp 0) ms" | tee -a "$OUT/startup.txt"
done
python3 - "$OUT/ab.jsonl" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
for q, bud, t in sorted({(r["qtype"], r["budget"], r["test"]) for r in rows}):
    for b in ("new", "old"):
        v = [r["tokens_per_second"] for r in rows
             if (r["qtype"], r["budget"], r["test"], r["build"]) == (q, bud, t, b)]
        print(q, bud, t, b, "median %.1f" % st.median(v) if v else "-", [round(x, 1) for x in v])
PY
