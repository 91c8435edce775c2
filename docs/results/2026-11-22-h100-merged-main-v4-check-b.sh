#!/bin/bash
# Check of merged main (hipfwd + load4) on the H100: tests, greedy ids, load/start-up, speed.
set -u
H=/tmp/mm; B=$H/bins
cat $H/smpartaa .device/sm2/smpartab > $H/smol.gguf
sha256sum $H/smol.gguf | tee $OUT/sha.txt
grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $OUT/sha.txt || { echo BAD SHA; exit 1; }
mkdir -p /work/main/target/release && ln -sfn $PWD/tests /work/main/tests && ln -sfn $B/rocmforge /work/main/target/release/rocmforge
export ROCMFORGE_KERNEL_CACHE=$H/kc ROCMFORGE_TEST_MODEL=$H/smol.gguf ROCMFORGE_SYNTH_MODEL=$H/s1b.gguf
f() { grep -v --line-buffered -e '^ *[0-9]*: ' -e '^ *at '; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
wall() { s=$(date +%s%N); $B/rocmforge run -m $H/$1.gguf --backend cuda --temp 0 -n 1 -p "Hello" >/dev/null 2>&1; e=$(date +%s%N); echo "wall $2 $1: $(ms $s $e) ms"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
{
date -u
echo "== gpu_gemm"; timeout 60 $B/gpu_gemm --test-threads 1 2>&1 | f | grep -E "test result|FAIL|panick"
echo "== cuda_kernels"; timeout 90 $B/cuda_kernels --test-threads 1 2>&1 | f | grep -E "test result|FAIL|panick"
echo "== cuda_forward"; timeout 200 $B/cuda_forward --nocapture --test-threads 1 2>&1 | f | tail -40
echo "== gpu_pipeline"; timeout 90 $B/gpu_pipeline --test-threads 1 2>&1 | f | grep -E "test |test result|FAIL|panick"
echo "== CLI greedy ids (SmolLM2, 32 tokens)"
P="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest where"
R="$B/rocmforge run --temp 0 -n 32 --json -m $H/smol.gguf -p"
timeout 60 $R "$P" --backend cpu --precision exact > $H/cpu.json 2>/dev/null
timeout 60 $R "$P" --backend cuda > $H/direct.json 2>/dev/null
timeout 60 $R "$P" --backend cuda --pipeline > $H/pipe.json 2>/dev/null
timeout 60 $R "$P" --backend cuda --pipeline --memory-budget 40% > $H/pipe40.json 2>/dev/null
python3 - <<PY
import json
c=json.load(open('$H/cpu.json'))
for n in ['direct','pipe','pipe40']:
    try: j=json.load(open('$H/%s.json'%n)); print(n, 'ids == cpu exact:', j['ids']==c['ids'], len(j['ids']))
    except Exception as e: print(n, 'FAILED', e)
PY
cat $H/s8b.gguf > /dev/null
echo "== warm bench -p 0 -n 1 x5 (8B)"
for i in 1 2 3 4 5; do $B/rocmforge bench --backend cuda -m $H/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2; done
echo "== warm process wall run -n 1 x5"
for i in 1 2 3 4 5; do wall s8b warm; done
echo "== cold process wall run -n 1 x3 (8B), bench cold x2"
for i in 1 2 3; do cold; wall s8b cold; done
for i in 1 2; do cold; $B/rocmforge bench --backend cuda -m $H/s8b.gguf -p 0 -n 16 -r 1 2>/dev/null | head -1; done
echo "== decode/prefill bench -p 512 -n 128 -r 3 (8B)"
$B/rocmforge bench --backend cuda -m $H/s8b.gguf -p 512 -n 128 -r 3 --json > $OUT/bench-8b.json 2>/dev/null
python3 -c "
import json;j=json.load(open('$OUT/bench-8b.json'))
print('load GB/s',round(j['load_gb_per_s'],1),'first token ms',round(j['first_token_ms']))
[print(t['test'],round(t['tokens_per_second'],1),[round(x,1) for x in t['samples']]) for t in j['tests']]"
echo "== pipelined runtime on CUDA: run --pipeline -n 128 (8B)"
$B/rocmforge run --pipeline --backend cuda -m $H/s8b.gguf --temp 0 -n 128 -p "Hello there" --json 2>/dev/null | python3 -c "
import json,sys;j=json.load(sys.stdin);print({k:v for k,v in j.get('timings',j).items() if not isinstance(v,(list,dict))})" 
date -u
} 2>&1 | tee $OUT/log.txt
