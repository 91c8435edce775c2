#!/bin/bash
# cudaload device call 6: kernels joined before the load. Greedy ids after == before; warm
# bench (-p 0 -n 1) and process wall alternated x3; cold bench (-p 0 -n 16) and wall x2.
B=$PWD/.device/cudaload
M=/tmp/rfm; mkdir -p $M
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
ms() { echo $(( ($2 - $1) / 1000000 )); }
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$B/rocmforge synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1
for v in rocmforge rocmforge_before; do $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1; done
echo "== ids"
for p in "The capital of France is" "The quick brown fox jumps over the lazy dog, and then it runs far into the old forest"; do
  for v in rocmforge rocmforge_before; do $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 32 --json -p "$p" > /tmp/ids_$v.json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('/tmp/ids_rocmforge.json'));b=json.load(open('/tmp/ids_rocmforge_before.json'));print('s8b',len(a['prompt_ids']),'prompt tokens: greedy ids after == before:',a['ids']==b['ids'],len(a['ids']))"
done
cat $M/s8b.gguf > /dev/null
echo "== warm bench -p 0 -n 1, alternated"
for i in 1 2 3; do for v in rocmforge rocmforge_before; do echo "-- $v $i"; $B/$v bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2; done; done
echo "== warm process wall, run -n 1"
for i in 1 2 3; do for v in rocmforge rocmforge_before; do
  s=$(date +%s%N); $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" > /dev/null 2>&1; e=$(date +%s%N)
  echo "$v warm wall run -n 1: $(ms $s $e) ms"; done; done
echo "== cold bench (-p 0 -n 16) and cold wall (run -n 1), alternated"
for i in 1 2; do for v in rocmforge rocmforge_before; do
  sync; echo 3 > /proc/sys/vm/drop_caches; echo "-- $v $i"; $B/$v bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -2
  sync; echo 3 > /proc/sys/vm/drop_caches; s=$(date +%s%N); $B/$v run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" > /dev/null 2>&1; e=$(date +%s%N)
  echo "$v cold wall run -n 1: $(ms $s $e) ms"
done; done
} 2>&1 | tee $OUT/log.txt
