#!/bin/bash
# load4 call 4 (final binary, with the kernel-cache prefetch): before = main f7debbd, after =
# branch load4, alternated. Greedy ids; warm bench and process wall; cold bench and wall (8B and
# the synth 1B, where the kernel loading is on the path to the first token).
B=$PWD/.device/load4
M=/tmp/rfm; mkdir -p $M; J=/tmp/rfj; mkdir -p $J
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
A=$B/rocmforge; R=$B/rocmforge_before
ms() { echo $(( ($2 - $1) / 1000000 )); }
wall() { # tag model binary [env...]
  local tag=$1 m=$2 bin=$3; shift 3
  s=$(date +%s%N); env "$@" $bin run -m $M/$m.gguf --backend cuda --temp 0 -n 1 -p "Hello" --json > $J/wall_$tag.json 2>/dev/null; e=$(date +%s%N)
  echo "wall $tag: $(ms $s $e) ms  $(python3 -c "
import json;j=json.load(open('$J/wall_$tag.json'));t=j['timings'];g=t['gen']
x=' | launch->epoch %d ms, last output->exit %d ms, early read %d MB'%((t['epoch_unix_ns']-$s)/1e6,($e-t['epoch_unix_ns'])/1e6-t['end_at_ms'],t['early_read_bytes']/1e6) if 'epoch_unix_ns' in t else ''
print('init %d load %d prompt %d%s'%(t['cuda_init_ms'],t['load_ms'],g['prompt_ms'],x))" 2>&1)"
}
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
$R synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1
$R synth --preset 1b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s1b.gguf 2>&1 | tail -1
sync; sleep 3
for v in $R $A $A; do $v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1; done
echo "== ids (8B), run --backend cuda --temp 0 -n 32"
P2="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest"
for p in "The capital of France is" "$P2"; do
  for v in $A $R; do $v run -m $M/s8b.gguf --backend cuda --temp 0 -n 32 --json -p "$p" > $J/ids_$(basename $v).json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('$J/ids_rocmforge.json'));b=json.load(open('$J/ids_rocmforge_before.json'));print('s8b',len(a['prompt_ids']),'prompt tokens: greedy ids after == before:',a['ids']==b['ids'],len(a['ids']))"
done
cat $M/s8b.gguf > /dev/null
echo "== warm, alternated: bench -p 0 -n 1 --json x3; process wall x3"
for i in 1 2 3; do for v in $R $A; do $v bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 --json > $J/b0_$(basename $v)_$i.json 2>/dev/null; done; done
$A bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -3
for i in 1 2 3; do wall before$i s8b $R; wall after$i s8b $A; done
echo "== cold, alternated: bench -p 0 -n 16 (8B); process wall run -n 1 (8B, 1B)"
for i in 1 2 3; do
  cold; $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 --json > $J/cold_rocmforge_before_$i.json 2>/dev/null
  cold; $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 --json > $J/cold_rocmforge_$i.json 2>/dev/null
  cold; wall cold_before$i s8b $R; cold; wall cold_after$i s8b $A
done
for i in 1 2; do cold; wall cold1b_before$i s1b $R; cold; wall cold1b_after$i s1b $A; done
cold; $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 2>/dev/null | head -3
date -u
} 2>&1 | tee $OUT/log.txt
python3 - <<PY | tee $OUT/summary.txt
import json,glob,statistics as st
for pat in ['b0_','cold_']:
    for v in ['rocmforge_before','rocmforge']:
        rs=[]
        for f in sorted(glob.glob("$J/"+pat+v+'_[0-9].json')):
            try: j=json.load(open(f))
            except Exception as e: print(f,e); continue
            u=j['load']['upload']; rs.append(j)
            print(f.split('/')[-1], {k:round(j[k],1) for k in ['cuda_init_ms','kernel_load_ms','ring_wait_ms','load_queue_ms','load_resident_ms','load_gb_per_s','first_forward_ms','first_token_ms']}, 'fill_ms',round(u['fill_s']*1e3,1),'slot_waits_ms',round(u['wait_s']*1e3,1),'queue_ms',round(u['queue_s']*1e3,1),'first_group_ms',round(u['first_group_s']*1e3,1),'early_MB',round(j.get('early_read_bytes',0)/1e6))
        if rs: print('  median',pat,v,'load GB/s',round(st.median([j['load_gb_per_s'] for j in rs]),1),'first token ms',round(st.median([j['first_token_ms'] for j in rs])),'kernels ms',round(st.median([j['kernel_load_ms'] for j in rs])))
PY
tar czf $OUT/json.tgz -C $J .
