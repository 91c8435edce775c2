#!/usr/bin/env bash
# One GPU lease, one call: start-up A/B of two builds (and llama-completion with LC=1), the
# exit's cost (cuda_exit_cost.py), traces, decode kernel times (ncu), served load at issue 18's
# shape (serve_loadgen; llama-server -np 32 beside it with LC=1), the prefix cache's TTFT.
# Staging, here (an ignored folder D travels with `run carry [D]`):
#   D/new.xz D/old.xz        xz of two stripped `rocmforge` builds (new, baseline)
#   D/loadgen.xz D/prefix.xz xz of the serve_loadgen / serve_prefix_ttft examples (release)
#   D/tok.gguf               the SmolLM2 tokenizer-only GGUF (../shared/bench/README.md)
#   D/teardown.py            scripts/cuda_exit_cost.py;  D/lc/  llamacpp-prepare.sh's output (LC=1)
#   D/su.sh                  this script
# Then: run carry [D] 'bash D/su.sh > $OUT/su.log 2>&1'. At most 8 files come back from $OUT.
set -u
D="$(cd "$(dirname "$0")" && pwd)"; W=/root/w; mkdir -p "$W"; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for b in new old loadgen prefix; do xz -dc "$D/$b.xz" > "$W/$b"; chmod +x "$W/$b"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
LB=/root/lc/build/bin; M=$W/8b.gguf
if [ "${LC:-0}" = 1 ]; then t=$(date +%s); bash "$D/lc/llamacpp-device.sh" "$D/lc" --server > "$OUT/lc-build.log" 2>&1; echo "llama.cpp build rc=$? $(( $(date +%s) - t )) s" | tee -a "$OUT/device.txt"; fi
[ -x "$LB/llama-completion" ] || LC=0
"$W/new" synth --preset 8b --qtype q4_0 --tokenizer-from "$D/tok.gguf" --out "$M" > /dev/null 2>&1 || { echo "synth failed"; exit 1; }
cat "$M" > /dev/null
export ROCMFORGE_KERNEL_CACHE=$W/kc
ms() { echo $(( $(date +%s%N) / 1000000 )); }
for b in new old; do "$W/$b" run --backend cuda -m "$M" --prompt Hello -n 1 --temp 0 > /dev/null 2>&1; done
[ "${LC:-0}" = 1 ] && "$LB/llama-completion" -m "$M" -p Hello -n 1 -ngl 99 -c 4096 --temp 0 -fa on -no-cnv < /dev/null > /dev/null 2>&1
S=$OUT/startup.txt
for i in 1 2 3 4 5 6 7; do
  for b in new old; do
    s=$(ms); "$W/$b" run --backend cuda -m "$M" --prompt Hello -n 1 --temp 0 --json > "$W/r.json" 2>/dev/null; rc=$?; e=$(ms)
    python3 -c "import json;j=json.load(open('$W/r.json'))['timings'];print('$b round $i wall $(( e - s )) ms rc=$rc open %.0f first %.0f total %.0f'%(j['open_ms'],j['first_token_ms'],j['total_ms']))" 2>/dev/null | tee -a "$S" || echo "$b round $i wall $(( e - s )) rc=$rc" | tee -a "$S"
  done
  [ "${LC:-0}" = 1 ] || continue
  s=$(ms); "$LB/llama-completion" -m "$M" -p Hello -n 1 -ngl 99 -c 4096 --temp 0 -fa on -no-cnv < /dev/null > /dev/null 2>&1; rc=$?; e=$(ms)
  echo "llama round $i wall $(( e - s )) ms rc=$rc" | tee -a "$S"
done
for i in 1 2 3; do s=$(ms); "$W/new" --version > /dev/null; echo "version wall $(( $(ms) - s )) ms" | tee -a "$S"; done
# The exit's share: each mode 3 times (python's own start is in every row alike).
for i in 1 2 3; do for m in ctx dev dev+kv dev+kv+pin dev+kv+pin+free; do
  s=$(date +%s%N); x=$(python3 "$D/teardown.py" $m); e=$(date +%s%N)
  echo "teardown $m total $(( (e - s) / 1000000 )) ms exit $(( (e - x) / 1000000 )) ms" | tee -a "$S"
done; done
for b in new old; do "$W/$b" run --backend cuda -m "$M" --prompt Hello -n 1 --temp 0 --trace "$OUT/trace-$b.json" > /dev/null 2> "$OUT/trace-$b.log"; done
# Decode: per-kernel durations at real clocks without cache flushes over ~3 tokens, beside the
# measured rate (the gaps between kernels = what CUDA graphs could take back).
/usr/local/cuda/bin/ncu --cache-control none --clock-control none --metrics gpu__time_duration.sum --csv \
  --launch-skip 3000 --launch-count 1074 "$W/new" run --backend cuda -m "$M" --prompt Hello -n 40 --temp 0 > "$OUT/ncu-decode.csv" 2> "$OUT/ncu.err"
"$W/new" bench --backend cuda -m "$M" -p 16 -n 128 -r 3 --json > "$OUT/bench-new.json" 2> /dev/null
"$W/old" bench --backend cuda -m "$M" -p 16 -n 128 -r 3 --json > "$OUT/bench-old.json" 2> /dev/null
# Where the 16-vector tensor-core product stalls: one gate/up launch of a 16-sequence step.
/usr/local/cuda/bin/ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section WarpStateStats --section Occupancy --section LaunchStats -k regex:mmvq_q4_0_q8a_mms --launch-skip 40 --launch-count 2 \
  "$W/new" bench --backend cuda -m "$M" -p 16 -n 16 --parallel 16 -r 1 > "$OUT/ncu-mms.txt" 2>&1
# Served load: 128-token prompts (110 filler words + template), 128 tokens each.
LG="--clients 1,8,16,32 --rounds 1 --max-tokens 128 --prompt-words 89"
timeout 240 "$W/loadgen" "$M" --backend cuda --max-num-seqs 32 $LG --out "$OUT/lg-ours.json" 2>&1 | tail -8 | tee "$OUT/lg-ours.txt"
# Decode steps of 17-32 sequences on the matrix-vector products (two 16-vector launches) instead of the GEMM.
ROCMFORGE_GPU_GEMM_ROWS=33 timeout 120 "$W/loadgen" "$M" --backend cuda --max-num-seqs 32 --clients 32 --rounds 1 --max-tokens 128 --prompt-words 89 --out "$OUT/lg-ours-rows33.json" 2>&1 | tail -3 | tee "$OUT/lg-ours-rows33.txt"
# The prefix cache on the GPU: 16 requests sharing a ~1,000-token system prompt, one after another.
timeout 120 "$W/prefix" "$M" --backend cuda --requests 16 --rounds 3 --out "$OUT/prefix-ttft.json" 2>&1 | tail -5 | tee "$OUT/prefix.txt"
[ "${LC:-0}" = 1 ] || { echo done; exit 0; }
"$LB/llama-server" -m "$M" -ngl 99 -np 32 -c 16384 -fa on --port 8181 > "$OUT/llama-server.log" 2>&1 &
P=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8181/health > /dev/null 2>&1 && break; sleep 0.5; done
timeout 240 "$W/loadgen" "$M" --addr 127.0.0.1:8181 $LG --out "$OUT/lg-llama.json" 2>&1 | tail -8 | tee "$OUT/lg-llama.txt"
kill $P; wait $P 2>/dev/null
echo done
