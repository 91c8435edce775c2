#!/usr/bin/env bash
# Same-lease A/B of the batched decode and the served load on the GPU machine, one binary and
# configurations chosen by environment (no second build to carry), and llama.cpp's
# `llama-server -np 32` beside the served load (issue 18's ratio). Used in the sixteenth
# session (docs/PERFORMANCE.md, "Sixteenth session"); edit CONFIGS below for the next A/B.
#
# Here:   scripts/device-build.sh                                     (.device/, .device-model*/)
#         mkdir -p .device-ab && cp scripts/device-batch-ab.sh .device-ab/ab.sh
#         python3 ../shared/bench/make-tokenizer-gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf .device-ab/tok.gguf
#         cargo build --release -p rocmforge-actors --features gpu-tests --example serve_loadgen
#         strip -o /tmp/lg target/release/examples/serve_loadgen && xz -c /tmp/lg > .device-ab/serve_loadgen.xz
#         bash ../shared/bench/llamacpp-prepare.sh /tmp/lc && mkdir -p .device-lc &&
#           cp /tmp/lc/llama.cpp.tar.gz /tmp/lc/llamacpp-device.sh .device-lc/   (no wheels: the
#           device's own cmake and ninja; .device + .device-lc + the tree stay under 64 MiB)
#         (.device-ab and .device-lc git-ignored: printf '/.device-ab/\n/.device-lc/\n' >> .git/info/exclude)
# There, each call within 30 s of the last:
#   run carry [".device-model"]   'bash .device-model/stash.sh'
#   run carry [".device-model-2"] 'bash .device-model-2/stash.sh'
#   run carry [".device", ".device-lc"] '(LC_JOBS=10 bash .device-lc/llamacpp-device.sh .device-lc --server
#       > /tmp/lc.log 2>&1) & OUT=/tmp/dc bash .device/device-check.sh > $OUT/check.log 2>&1;
#       grep -A18 "executable " $OUT/check.log; wait'
#     (the llama.cpp build, ~500 s at -j 10, slows the tests: gpu_forward ran past its 300 s
#     timeout beside it once; build it in a call of its own if the check matters more)
#   run carry [".device-ab"] 'bash .device-ab/ab.sh'   (~170 s; <= 8 files come back)
set -u
W=/tmp/rocmforge-device
NEW=$W/bin/rocmforge
D="$(cd "$(dirname "$0")" && pwd)"
OUT=${OUT:-/tmp/out}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
[ -x "$NEW" ] || { echo "no $NEW: run device-check.sh in the call before"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
for q in q4_0 q4_k; do
    [ -f "$W/8b-$q.gguf" ] || "$NEW" synth --preset 8b --qtype "$q" --tokenizer-from "$D/tok.gguf" \
        --out "$W/8b-$q.gguf" > /dev/null 2>&1 || { echo "synth $q failed"; exit 1; }
    cat "$W/8b-$q.gguf" > /dev/null
done
echo "models ready at +$(( $(date +%s) - t0 )) s"
export ROCMFORGE_KERNEL_CACHE=$W/kernels-ab
"$NEW" bench -m "$W/8b-q4_0.gguf" --backend cuda -p 16 -n 4 --parallel 2 -r 1 > /dev/null 2>&1
# CONFIGS: each name's environment (the sixteenth session's: two tiles a block or not, the GEMM
# from 33 rows or from 17 as before). Edit with the loops below for the next A/B.
cfg_env() {
    case $1 in
        new) echo "" ;;
        nopair) echo "ROCMFORGE_GPU_MMA_PAIR=0" ;;
        main) echo "ROCMFORGE_GPU_MMA_PAIR=0 ROCMFORGE_GPU_GEMM_ROWS=17" ;;
    esac
}
: > "$OUT/ab.jsonl"
for round in $(seq 1 "$ROUNDS"); do
    for q in q4_0 q4_k; do
        for cfg in new nopair main; do
            env $(cfg_env $cfg) timeout 120 "$NEW" bench -m "$W/8b-$q.gguf" --backend cuda -p 32 -n 64 \
                --parallel 8,16,24,32 -r 2 --json 2>/dev/null | python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print(json.dumps(dict(r, build='$cfg', qtype='$q', round=$round)))" >> "$OUT/ab.jsonl"
        done
    done
    echo "bench round $round done at +$(( $(date +%s) - t0 )) s"
done
python3 - "$OUT/ab.jsonl" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
tests = sorted({(r["qtype"], r["test"]) for r in rows})
print("qtype test          new      nopair   main   (medians over rounds, tok/s)")
for q, t in tests:
    m = {}
    for b in ("new", "nopair", "main"):
        v = [r["tokens_per_second"] for r in rows if r["qtype"] == q and r["test"] == t and r["build"] == b]
        m[b] = f"{st.median(v):8.1f}" if v else "       -"
    print(f"{q} {t:12s} {m['new']} {m['nopair']} {m['main']}")
PY
# Served load at issue 18's shape, a warm 1-client level first.
LG=$W/serve_loadgen
xz -dc "$D/serve_loadgen.xz" > "$LG" && chmod +x "$LG"
for round in 1 2; do
    for cfg in new main; do
        env $(cfg_env $cfg) timeout 150 "$LG" "$W/8b-q4_0.gguf" --backend cuda --max-num-seqs 32 \
            --clients 1,8,32 --rounds 1 --max-tokens 128 --prompt-words 89 \
            --out "$OUT/loadgen-$cfg-$round.json" > "$OUT/loadgen-$cfg-$round.txt" 2>&1
        echo "== loadgen $cfg round $round"; grep -E "clients|tok/s" "$OUT/loadgen-$cfg-$round.txt" | tail -4
    done
done
echo "ours done at +$(( $(date +%s) - t0 )) s"
# llama.cpp's server beside it (built in the call before into /root/lc/build/bin).
LS=/root/lc/build/bin/llama-server
if [ -x "$LS" ]; then
    for fa in on; do
        "$LS" -m "$W/8b-q4_0.gguf" -ngl 99 -np 32 -c 16384 -fa $fa --port 8088 --host 127.0.0.1 \
            > "$W/llama-server.log" 2>&1 &
        pid=$!
        for i in $(seq 1 60); do
            curl -sf http://127.0.0.1:8088/health > /dev/null 2>&1 && break; sleep 1
        done
        timeout 150 "$LG" --addr 127.0.0.1:8088 --clients 1,8,32 --rounds 1 --max-tokens 128 \
            --prompt-words 89 --out "$OUT/loadgen-llama-fa$fa.json" > "$OUT/loadgen-llama-fa$fa.txt" 2>&1
        echo "== llama-server -np 32 -fa $fa"; grep -E "clients|tok/s" "$OUT/loadgen-llama-fa$fa.txt" | tail -4
        kill $pid; wait $pid 2>/dev/null
    done
    tail -3 "$W/llama-server.log"
else
    echo "no $LS"
fi
echo "all done at +$(( $(date +%s) - t0 )) s"
# Files back: ab.jsonl, gpu.txt, the loadgen JSONs (<= 8 files: the .txt logs are summarised above).
rm -f "$OUT"/loadgen-*.txt
