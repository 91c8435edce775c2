#!/bin/bash
# cudaload: one device call. Correctness (greedy ids before == after, 8B and 1B; cuda_forward on
# the synth 1B incl. the 40% weight budget), then the 8B load / first-token numbers, before
# (main e9822dc) vs after (branch cudaload), alternated: warm bench, warm process wall, a
# cold bench and cold process wall; cold without the readahead thread.
B=$PWD/.device/cudaload
M=/tmp/rfm; mkdir -p $M; J=/tmp/rfj; mkdir -p $J
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
ms() { echo $(( ($2 - $1) / 1000000 )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
nproc | tee -a $OUT/gpu.txt
$B/rocmforge synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1
$B/rocmforge synth --preset 1b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s1b.gguf 2>&1 | tail -1
ls -l $M | tee -a $OUT/gpu.txt
# Kernel cache warm-up for both binaries (first start compiles with NVRTC).
for v in rocmforge rocmforge_before; do $B/$v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1; done
{
echo "== ids"
for m in s1b s8b; do for v in rocmforge rocmforge_before; do
  $B/$v run -m $M/$m.gguf --backend cuda --temp 0 -n 32 --json -p "The capital of France is" > $J/run_${m}_$v.json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('$J/run_${m}_rocmforge.json'));b=json.load(open('$J/run_${m}_rocmforge_before.json'));print('$m greedy ids after == before:',a['ids']==b['ids'],len(a['ids']),a['ids'][:8])"
done
P2="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest"
for m in s1b s8b; do for v in rocmforge rocmforge_before; do
  $B/$v run -m $M/$m.gguf --backend cuda --temp 0 -n 32 --json -p "$P2" > $J/run_${m}_$v.json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('$J/run_${m}_rocmforge.json'));b=json.load(open('$J/run_${m}_rocmforge_before.json'));print('$m long prompt (',len(a['prompt_ids']),'tokens, cuBLAS prefill) greedy ids after == before:',a['ids']==b['ids'],len(a['ids']),a['ids'][:8])"
done
echo "== cuda_forward (synth 1B, after)"
mkdir -p /work/wt-cudaload/tests/data/smollm2-logits && cp tests/data/smollm2-logits/cases.json /work/wt-cudaload/tests/data/smollm2-logits/
ROCMFORGE_SYNTH_MODEL=$M/s1b.gguf timeout 90 $B/cuda_forward synth_cuda_matches_cpu --nocapture --test-threads 1 2>&1 | grep -v "^ *[0-9]*: \|^  *at " | tail -25
cat $M/s8b.gguf > /dev/null
echo "== warm bench (-p 512 -n 128 -r 2 json, then -p 0 -n 1 text), alternated"
for i in 1 2 3; do for v in rocmforge rocmforge_before; do
  $B/$v bench --backend cuda -m $M/s8b.gguf -p 512 -n 128 -r 2 --json > $J/w_${v}_$i.json 2>/dev/null
  echo "-- $v $i"; $B/$v bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2
done; done
echo "== warm process wall, run -n 1"
for i in 1 2 3; do for v in rocmforge rocmforge_before; do
  s=$(date +%s%N); $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" > /dev/null 2>&1; e=$(date +%s%N)
  echo "$v warm wall run -n 1: $(ms $s $e) ms"; done; done
echo "== cold bench (-p 0 -n 16) and cold wall (run -n 1), alternated"
for i in 1 2 3; do for v in rocmforge rocmforge_before; do
  sync; echo 3 > /proc/sys/vm/drop_caches; echo "-- $v $i"; $B/$v bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -3
  sync; echo 3 > /proc/sys/vm/drop_caches; s=$(date +%s%N); $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" > /dev/null 2>&1; e=$(date +%s%N)
  echo "$v cold wall run -n 1: $(ms $s $e) ms"
done; done
} 2>&1 | tee $OUT/log.txt
python3 - <<PY | tee $OUT/summary.txt
import json,glob
for f in sorted(glob.glob("$J/w_*.json")):
    try: j=json.load(open(f))
    except Exception as e: print(f,e); continue
    print(f.split('/')[-1], {k:round(j[k],1) for k in ['cuda_init_ms','kernel_load_ms','model_open_ms','ring_wait_ms','load_queue_ms','load_resident_ms','load_gb_per_s','first_forward_ms','first_token_ms']}, [ (t['test'],round(t['tokens_per_second'],1)) for t in j['tests']])
PY
tar czf $OUT/json.tgz -C $J .
