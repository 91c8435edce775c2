#!/bin/bash
# load4 call 2 (development): writeback check of main, correctness ids, before/after warm,
# knob sweeps of the new ring, cold with/without early read, teardown (fast exit), NVRTC loads.
B=$PWD/.device/load4
M=/tmp/rfm; mkdir -p $M; J=$OUT/j; mkdir -p $J
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
A=$B/rocmforge; R=$B/rocmforge_before
ms() { echo $(( ($2 - $1) / 1000000 )); }
mem() { grep -E "^(Dirty|Writeback):" /proc/meminfo | tr -s ' ' | tr '\n' ' '; }
wall() { # tag binary [env...]
  local tag=$1 bin=$2; shift 2
  s=$(date +%s%N); env "$@" $bin run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" --json > $J/wall_$tag.json 2>/dev/null; e=$(date +%s%N)
  echo "wall $tag: $(ms $s $e) ms  $(python3 -c "import json;j=json.load(open('$J/wall_$tag.json'));t=j['timings'];g=t['gen'];print('init',round(t['cuda_init_ms']),'load',round(t['load_ms']),'prompt',round(g['prompt_ms']),'end_at',round(t.get('end_at_ms',-1)))" 2>&1)"
}
b0() { $2 bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -3 | sed "s/^/[$1] /"; }
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r; date -u
ls $M 2>/dev/null
[ -f $M/s8b.gguf ] || { $R synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1; }
[ -f $M/s1b.gguf ] || { $R synth --preset 1b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s1b.gguf 2>&1 | tail -1; }
sync
for v in $R $A; do $v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1; done
ls /tmp/rf-kc | grep -v "\.bin$"; cat /tmp/rf-kc/*.stamp
echo "== NVRTC loaded? (LD_DEBUG=files, count of libnvrtc lines)"
for v in $R $A; do echo "$(basename $v): $(LD_DEBUG=files $v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p Hi 2>&1 >/dev/null | grep -c 'file=.*libnvrtc')"; done
echo "== ids"
P2="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest"
for m in s1b s8b; do for p in "The capital of France is" "$P2"; do
  for v in $A $R; do $v run -m $M/$m.gguf --backend cuda --temp 0 -n 32 --json -p "$p" > $J/ids_$(basename $v).json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('$J/ids_rocmforge.json'));b=json.load(open('$J/ids_rocmforge_before.json'));print('$m',len(a['prompt_ids']),'prompt tokens: ids after == before:',a['ids']==b['ids'],len(a['ids']),a['ids'][:6])"
done; done
echo "== streamed (40% budget) bench after, tg32"
$A bench --backend cuda -m $M/s8b.gguf -p 0 -n 32 -r 1 --weight-budget 1700000000 2>&1 | tail -2
echo "== warm alternated: bench -p 0 -n 1 json x4"
for i in 1 2 3 4; do for v in $R $A; do $v bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 --json > $J/b0_$(basename $v)_$i.json 2>/dev/null; done; done
echo "== after text x2"; for i in 1 2; do b0 after $A; done
echo "== warm walls"
for i in 1 2 3; do wall before$i $R; wall after$i $A; wall afterfx$i $A ROCMFORGE_FAST_EXIT=1; done
echo "== knob sweep (after)"
for kv in ROCMFORGE_UPLOAD_THREADS=8 ROCMFORGE_UPLOAD_THREADS=16 ROCMFORGE_UPLOAD_SLOTS=4 ROCMFORGE_UPLOAD_SLOTS=16 ROCMFORGE_UPLOAD_SLOT_MIB=8 ROCMFORGE_UPLOAD_SLOT_MIB=32 ROCMFORGE_UPLOAD_TASK_KIB=1024 ROCMFORGE_UPLOAD_TASK_KIB=4096 ROCMFORGE_READAHEAD=0; do
  for i in 1 2; do env $kv $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -2 | sed "s/^/[$kv] /"; done; done
echo "== cold"
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
for i in 1 2; do
  cold; env $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -1 | sed "s/^/[before cold] /"
  cold; $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -3 | sed "s/^/[after cold] /"
  cold; ROCMFORGE_EARLY_READ=1024 $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>&1 | head -3 | sed "s/^/[after+early cold] /"
done
for i in 1 2; do
  cold; wall cbefore$i $R; cold; wall cafter$i $A; cold; wall cearly$i $A ROCMFORGE_EARLY_READ=1024; cold; wall cearlyfx$i $A ROCMFORGE_EARLY_READ=1024 ROCMFORGE_FAST_EXIT=1
done
echo "== main during writeback of a fresh file (before binary)"
$R synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/w8b.gguf 2>&1 | tail -1
T0=$(date +%s%N)
for i in $(seq 1 14); do
  echo "t=$(ms $T0 $(date +%s%N)) ms $(mem)"; $R bench --backend cuda -m $M/w8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -1 | grep -o "resident.*GB/s)"; sleep 2
done
date -u
} 2>&1 | tee $OUT/log.txt
python3 - <<PY | tee $OUT/summary.txt
import json,glob
for f in sorted(glob.glob("$J/b0_*.json")):
    try: j=json.load(open(f))
    except Exception as e: print(f,e); continue
    u=j['load']['upload']
    print(f.split('/')[-1], {k:round(j[k],1) for k in ['cuda_init_ms','kernel_load_ms','ring_wait_ms','load_queue_ms','load_resident_ms','load_gb_per_s','first_forward_ms','first_token_ms']}, 'fill',round(u['fill_s']*1e3,1),'wait',round(u['wait_s']*1e3,1),'queue',round(u['queue_s']*1e3,1),'first_group',round(u['first_group_s']*1e3,1))
PY
rm -f $M/w8b.gguf
