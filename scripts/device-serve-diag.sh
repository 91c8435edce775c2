#!/usr/bin/env bash
# The call after device-check.sh (which leaves the build in
# /tmp/rocmforge-device/bin): where the served path loses against `bench`, and an ncu breakdown
# of an 8-sequence decode step.
#
# Prep here (see scripts/device-batch-ab.sh's header for the tokenizer GGUF):
#   .device-ab/tok.gguf          python3 ../shared/bench/make-tokenizer-gguf.py <SmolLM2 gguf> .device-ab/tok.gguf
#   .device-ab/serve_loadgen.xz  cargo build --release -p rocmforge-actors --features gpu-tests \
#                                  --example serve_loadgen; strip; xz
# then, within 30 s of device-check.sh's call:
#   run carry [".device-ab"]  'OUT=$OUT bash scripts/device-serve-diag.sh'
# Back in $OUT: gpu.txt, bench.json, loadgen.json, ncu8-summary.txt.
set -u
W=/tmp/rocmforge-device; NEW=$W/bin/rocmforge; D="${DIAG_DIR:-$(cd "$(dirname "$0")"/.. && pwd)/.device-ab}"; OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -x "$NEW" ] || { echo "no $NEW"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
[ -f "$W/8b-q4_0.gguf" ] || "$NEW" synth --preset 8b --qtype q4_0 --tokenizer-from "$D/tok.gguf" \
    --out "$W/8b-q4_0.gguf" > /dev/null 2>&1 || { echo "synth failed"; exit 1; }
cat "$W/8b-q4_0.gguf" > /dev/null
echo "model ready at +$(( $(date +%s) - t0 )) s"
export ROCMFORGE_KERNEL_CACHE=$W/kernels-diag
# Decode alone at the served shape's depth (128-token prompts): 1, 8 and 32 sequences.
timeout 150 "$NEW" bench -m "$W/8b-q4_0.gguf" --backend cuda -p 128 -n 128 -d 128 --parallel 8,32 -r 2 --json \
    2> "$OUT/bench.err" > "$OUT/bench.json"
python3 -c "
import json; [print(r['test'], round(r['tokens_per_second'],1)) for r in json.load(open('$OUT/bench.json'))]" || tail -5 "$OUT/bench.err"
echo "bench done at +$(( $(date +%s) - t0 )) s"
LG=$W/serve_loadgen
xz -dc "$D/serve_loadgen.xz" > "$LG" && chmod +x "$LG"
timeout 200 "$LG" "$W/8b-q4_0.gguf" --backend cuda --max-num-seqs 32 --clients 1,1,1,8,8,32,32 --rounds 1 \
    --max-tokens 128 --prompt-words 89 --out "$OUT/loadgen.json" > "$OUT/loadgen.txt" 2>&1
grep -A8 "clients" "$OUT/loadgen.txt" | head -9 || tail -5 "$OUT/loadgen.txt"
echo "loadgen done at +$(( $(date +%s) - t0 )) s"
# ncu: ~3 steps of 8 sequences (skipped: the one-sequence tg test, 2 x 25 steps of ~400 launches, and the 8-sequence untimed run).
NCU=/usr/local/cuda/bin/ncu; command -v ncu > /dev/null && NCU=ncu
timeout 240 $NCU --metrics gpu__time_duration.sum --csv --launch-skip 26000 --launch-count 1200 \
    "$NEW" bench -m "$W/8b-q4_0.gguf" --backend cuda -p 0 -n 24 --parallel 8 -r 1 > "$W/ncu8.csv" 2> "$W/ncu8.err"
echo "ncu rc=$? at +$(( $(date +%s) - t0 )) s"; tail -2 "$W/ncu8.err"
python3 - "$W/ncu8.csv" > "$OUT/ncu8-summary.txt" <<'PY'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    v = float(r["Metric Value"].replace(",", ""))
    u = r.get("Metric Unit", "ns")
    v = v / 1000.0 if u in ("nsecond", "ns") else (v if u in ("usecond", "us") else v * 1000.0)
    k = r["Kernel Name"].split("(")[0]; tot[k] += v; cnt[k] += 1
allt = sum(tot.values()); n = sum(cnt.values())
steps = n / 400.0
print(f"launches {n}, kernel time {allt/1000:.2f} ms (~{steps:.1f} steps of ~400 launches)")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:30]:
    print(f"{k:48s} {cnt[k]:6d} {v/1000:8.2f} ms {100*v/allt:5.1f}%  {v/cnt[k]:8.1f} us avg")
PY
cat "$OUT/ncu8-summary.txt"
rm -f "$OUT/loadgen.txt" "$OUT/bench.err"
echo "all done at +$(( $(date +%s) - t0 )) s"
