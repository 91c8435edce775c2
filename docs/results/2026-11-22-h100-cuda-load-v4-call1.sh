#!/bin/bash
# load4 call 1: does main (f7debbd) regress after sync? dirty vs synced warm runs, knob sweeps,
# probe of pinning/alloc/fill costs, cold runs.
B=$PWD/.device/load4
M=/tmp/rfm; mkdir -p $M; J=$OUT/j; mkdir -p $J
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
R=$B/rocmforge_before
ms() { echo $(( ($2 - $1) / 1000000 )); }
mem() { grep -E "^(Dirty|Writeback):" /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo; }
wall() { # tag, extra env...
  local tag=$1; shift
  s=$(date +%s%N); env "$@" $R run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" --json > $J/wall_$tag.json 2>/dev/null; e=$(date +%s%N)
  echo "wall $tag: $(ms $s $e) ms  $(python3 -c "import json;j=json.load(open('$J/wall_$tag.json'));t=j['timings'];g=t['gen'];print('init',round(t['cuda_init_ms']),'load',round(t['load_ms']),'prompt',round(g['prompt_ms']),'decode',round(g['decode_ms']))")"
}
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; date -u
df -h /tmp | tail -1; mount | grep -E " / | /tmp " | head -3
ldconfig -p | grep -E "nvrtc|libcuda.so|cublas" | head; ls -laL /usr/local/cuda/lib64/libnvrtc* 2>/dev/null | head -5
cat /sys/kernel/mm/transparent_hugepage/enabled
$R synth --preset 1b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s1b.gguf 2>&1 | tail -1
$R run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1
sync; sleep 2
echo "== synth 8B, then at once (dirty pages)"
s=$(date +%s%N); $R synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1; e=$(date +%s%N); echo "synth $(ms $s $e) ms"
mem
for i in 1 2; do $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2; mem; done
for i in 1 2; do wall dirty$i; done
mem
s=$(date +%s%N); sync; e=$(date +%s%N); echo "sync $(ms $s $e) ms"; sleep 5; mem
echo "== warm after sync: bench -p 0 -n 1 (json) and wall, x3"
for i in 1 2 3; do $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 --json > $J/b0_$i.json 2>/dev/null; wall synced$i; done
echo "== warm after sync: bench -p 512 -n 128 -r 2, x3"
for i in 1 2 3; do $R bench --backend cuda -m $M/s8b.gguf -p 512 -n 128 -r 2 --json > $J/b512_$i.json 2>/dev/null; done
echo "== knob sweep (bench -p 0 -n 1), 2 runs each"
for kv in ROCMFORGE_UPLOAD_THREADS=12 ROCMFORGE_UPLOAD_THREADS=8 ROCMFORGE_UPLOAD_THREADS=16 ROCMFORGE_UPLOAD_THREADS=24 ROCMFORGE_UPLOAD_SLOT_MIB=8 ROCMFORGE_UPLOAD_SLOT_MIB=32 "ROCMFORGE_UPLOAD_SLOTS=8 ROCMFORGE_UPLOAD_SLOT_MIB=8" ROCMFORGE_READAHEAD=0; do
  for i in 1 2; do echo "-- $kv"; env $kv $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2; done; done
echo "== probe"
timeout 120 $B/load_probe $M/s8b.gguf
echo "== cold"
for i in 1 2 3; do
  sync; echo 3 > /proc/sys/vm/drop_caches; echo "-- cold bench $i"; $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -3
  sync; echo 3 > /proc/sys/vm/drop_caches; wall cold$i
done
sync; echo 3 > /proc/sys/vm/drop_caches; s=$(date +%s%N); python3 -c pass; e=$(date +%s%N); echo "cold python3 -c pass: $(ms $s $e) ms"
s=$(date +%s%N); cat /usr/local/cuda/lib64/libnvrtc.so* >/dev/null 2>&1; e=$(date +%s%N); echo "cold cat libnvrtc*: $(ms $s $e) ms"
s=$(date +%s%N); dd if=$M/s8b.gguf of=/dev/null bs=4M 2>&1 | tail -1; e=$(date +%s%N); echo "cold dd: $(ms $s $e) ms"
date -u
} 2>&1 | tee $OUT/log.txt
python3 - <<PY | tee $OUT/summary.txt
import json,glob
for f in sorted(glob.glob("$J/b*.json")):
    try: j=json.load(open(f))
    except Exception as e: print(f,e); continue
    u=j['load']['upload']
    print(f.split('/')[-1], {k:round(j[k],1) for k in ['cuda_init_ms','kernel_load_ms','model_open_ms','ring_wait_ms','load_queue_ms','load_resident_ms','load_gb_per_s','first_forward_ms','first_token_ms']}, 'fill',round(u['fill_s']*1e3,1),'wait',round(u['wait_s']*1e3,1),'queue',round(u['queue_s']*1e3,1),'first_group',round(u['first_group_s']*1e3,1), [ (t['test'],round(t['tokens_per_second'],1)) for t in j['tests']])
PY
