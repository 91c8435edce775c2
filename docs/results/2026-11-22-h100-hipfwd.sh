#!/bin/bash
# hipfwd device check (H100): the vendor-neutral forward pass (backend::gpu) on CUDA.
# (a) portable GEMM kernel vs CPU (odd shapes), cuBLAS for comparison; the kernel suite on the
# generic launchers; (b) tests/cuda_forward.rs with cuBLAS; (c) the same with
# ROCMFORGE_NO_CUBLAS=1 (the portable GEMM carries prefill); the pipeline tests (GpuLayered on
# CUDA); (d) CLI greedy ids, CPU exact vs CUDA direct/pipelined, with and without cuBLAS;
# a pp512 bench, cuBLAS vs portable.
set -u
H=/tmp/hf
B=$H/bins
cat $H/smpartaa .device/sm2/smpartab > $H/smol.gguf
sha256sum $H/smol.gguf | tee $OUT/sha.txt
grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $OUT/sha.txt || { echo BAD SHA; exit 1; }
mkdir -p /work/wt-hipfwd && ln -sfn $PWD/tests /work/wt-hipfwd/tests
export ROCMFORGE_KERNEL_CACHE=$H/kc
export ROCMFORGE_TEST_MODEL=$H/smol.gguf
f() { grep -v --line-buffered -e '^ *[0-9]*: ' -e '^ *at '; }
{
date -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$B/rocmforge synth --preset 1b --qtype q4_0 --tokenizer-from $H/smol.gguf --out $H/s1b.gguf 2>&1 | tail -1
echo "== (a) gpu_gemm"; timeout 60 $B/gpu_gemm --nocapture --test-threads 1 2>&1 | f
echo "== cuda_kernels"; timeout 90 $B/cuda_kernels --test-threads 1 2>&1 | f | grep -v "^test .* ok$"
echo "== (b) cuda_forward, cuBLAS"; ROCMFORGE_SYNTH_MODEL=$H/s1b.gguf timeout 150 $B/cuda_forward --nocapture --test-threads 1 2>&1 | f
echo "== (c) cuda_forward, ROCMFORGE_NO_CUBLAS=1"; ROCMFORGE_NO_CUBLAS=1 ROCMFORGE_SYNTH_MODEL=$H/s1b.gguf timeout 150 $B/cuda_forward --nocapture --test-threads 1 2>&1 | f
echo "== gpu_pipeline"; timeout 60 $B/gpu_pipeline --nocapture --test-threads 1 2>&1 | f
echo "== (d) CLI greedy ids"
P="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest where"
R="$B/rocmforge run --temp 0 -n 32 --json -m $H/smol.gguf -p"
timeout 60 $R "$P" --backend cpu --precision exact > $H/cpu.json 2>$H/cpu.err
timeout 60 $R "$P" --backend cuda > $H/direct.json 2>$H/direct.err
timeout 60 $R "$P" --backend cuda --pipeline > $H/pipe.json 2>$H/pipe.err
ROCMFORGE_NO_CUBLAS=1 timeout 60 $R "$P" --backend cuda > $H/direct_nb.json 2>$H/direct_nb.err
ROCMFORGE_NO_CUBLAS=1 timeout 60 $R "$P" --backend cuda --pipeline > $H/pipe_nb.json 2>$H/pipe_nb.err
python3 - <<PY
import json
c=json.load(open('$H/cpu.json'))
print('prompt tokens', len(c['prompt_ids']), 'cpu ids', c['ids'])
for n in ['direct','pipe','direct_nb','pipe_nb']:
    try:
        j=json.load(open('$H/%s.json'%n)); print(n, 'ids == cpu exact:', j['ids']==c['ids'], len(j['ids']))
    except Exception as e: print(n, 'FAILED', e, open('$H/%s.err'%n).read()[-800:])
PY
echo "== pp512 / tg64 bench: cuBLAS vs portable (CudaModel)"
for m in s1b smol; do for nb in 0 1; do
  echo "-- $m ROCMFORGE_NO_CUBLAS=$nb"; ROCMFORGE_NO_CUBLAS=$nb timeout 60 $B/rocmforge bench --backend cuda -m $H/$m.gguf -p 512 -n 64 -r 3 2>&1 | grep -E "^pp|^tg"
done; done
date -u
} 2>&1 | tee $OUT/log.txt
