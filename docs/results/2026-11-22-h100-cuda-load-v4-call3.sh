#!/bin/bash
# load4 call 3 (final): before = main f7debbd, after = branch load4, alternated in one call.
# Correctness (greedy ids before == after; cuda_forward synth 1B incl. 40% budget), warm load /
# first token / process wall, ring variants, cold bench and wall (early read on/off), teardown.
B=$PWD/.device/load4
M=/tmp/rfm; mkdir -p $M; J=/tmp/rfj; mkdir -p $J
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
A=$B/rocmforge; R=$B/rocmforge_before
ms() { echo $(( ($2 - $1) / 1000000 )); }
wall() { # tag binary [env...]
  local tag=$1 bin=$2; shift 2
  s=$(date +%s%N); env "$@" $bin run -m $M/s8b.gguf --backend cuda --temp 0 -n 1 -p "Hello" --json > $J/wall_$tag.json 2>/dev/null; e=$(date +%s%N)
  echo "wall $tag: $(ms $s $e) ms  $(python3 -c "
import json;j=json.load(open('$J/wall_$tag.json'));t=j['timings'];g=t['gen']
x=' launch->epoch %d ms, last output->exit %d ms, early read %d MB'%((t['epoch_unix_ns']-$s)/1e6,($e-t['epoch_unix_ns'])/1e6-t['end_at_ms'],t['early_read_bytes']/1e6) if 'epoch_unix_ns' in t else ''
print('init',round(t['cuda_init_ms']),'load',round(t['load_ms']),'prompt',round(g['prompt_ms'])+x)" 2>&1)"
}
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uname -r; date -u
$R synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s8b.gguf 2>&1 | tail -1
$R synth --preset 1b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $M/s1b.gguf 2>&1 | tail -1
sync; sleep 3
for v in $R $A $A; do $v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p "Hi" >/dev/null 2>&1; done
echo "== NVRTC loaded on a cached start? (LD_DEBUG=files lines naming libnvrtc)"
for v in $R $A; do echo "$(basename $v): $(LD_DEBUG=files $v run -m $M/s1b.gguf --backend cuda --temp 0 -n 2 -p Hi 2>&1 >/dev/null | grep -c 'file=.*libnvrtc')"; done
echo "== ids: run --backend cuda --temp 0 -n 32"
P2="The quick brown fox jumps over the lazy dog, and then it runs far into the old forest"
for m in s1b s8b; do for p in "The capital of France is" "$P2"; do
  for v in $A $R; do $v run -m $M/$m.gguf --backend cuda --temp 0 -n 32 --json -p "$p" > $J/ids_$(basename $v).json 2>/dev/null; done
  python3 -c "
import json;a=json.load(open('$J/ids_rocmforge.json'));b=json.load(open('$J/ids_rocmforge_before.json'));print('$m',len(a['prompt_ids']),'prompt tokens: greedy ids after == before:',a['ids']==b['ids'],len(a['ids']),a['ids'][:6])"
done; done
echo "== cuda_forward synth_cuda_matches_cpu (after; synth 1B vs CPU, unbounded and 40% budget)"
mkdir -p /work/wt-load4 && ln -sfn $PWD/tests /work/wt-load4/tests
ROCMFORGE_SYNTH_MODEL=$M/s1b.gguf timeout 200 $B/cuda_forward synth_cuda_matches_cpu --nocapture --test-threads 1 2>&1 | grep -v "^ *[0-9]*: \|^  *at " | tail -14
cat $M/s8b.gguf > /dev/null
echo "== warm, alternated: bench -p 0 -n 1 --json x4, bench -p 512 -n 128 -r 2 --json x3"
for i in 1 2 3 4; do for v in $R $A; do $v bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 --json > $J/b0_$(basename $v)_$i.json 2>/dev/null; done; done
for i in 1 2 3; do for v in $R $A; do $v bench --backend cuda -m $M/s8b.gguf -p 512 -n 128 -r 2 --json > $J/b512_$(basename $v)_$i.json 2>/dev/null; done; done
echo "== after, text"; for i in 1 2; do $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -3; done
echo "== warm process wall, run -n 1, alternated"
for i in 1 2 3 4; do wall before$i $R; wall after$i $A; done
for i in 1 2 3; do wall after_exit1_$i $A ROCMFORGE_FAST_EXIT=1; wall after_exit2_$i $A ROCMFORGE_FAST_EXIT=2; done
echo "== ring variants (after, bench -p 0 -n 1)"
for kv in "ROCMFORGE_UPLOAD_SLOTS=4 ROCMFORGE_UPLOAD_SLOT_MIB=16" "ROCMFORGE_UPLOAD_SLOTS=16 ROCMFORGE_UPLOAD_SLOT_MIB=4" "ROCMFORGE_UPLOAD_SLOTS=4 ROCMFORGE_UPLOAD_SLOT_MIB=8" ROCMFORGE_UPLOAD_THREADS=16; do
  for i in 1 2; do env $kv $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 1 -r 1 2>/dev/null | head -1 | grep -o "resident.*GB/s)" | sed "s/^/[$kv] /"; done; done
echo "== cold, alternated: bench -p 0 -n 16; process wall run -n 1 (after: early read on, off)"
for i in 1 2 3; do
  cold; $R bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 --json > $J/cold_rocmforge_before_$i.json 2>/dev/null
  cold; $A bench --backend cuda -m $M/s8b.gguf -p 0 -n 16 -r 1 --json > $J/cold_rocmforge_$i.json 2>/dev/null
  cold; wall cold_before$i $R; cold; wall cold_after$i $A; cold; wall cold_after_noearly$i $A ROCMFORGE_EARLY_READ=0
done
date -u
} 2>&1 | tee $OUT/log.txt
python3 - <<PY | tee $OUT/summary.txt
import json,glob,statistics as st
def row(f):
    j=json.load(open(f)); u=j['load']['upload']
    return j,u
for pat in ['b0_*','b512_*','cold_*']:
    for v in ['rocmforge_before','rocmforge']:
        fs=sorted(glob.glob("$J/"+pat.replace('*','')+v+'_[0-9].json'))
        rs=[]
        for f in fs:
            try: j,u=row(f)
            except Exception as e: print(f,e); continue
            rs.append(j)
            print(f.split('/')[-1], {k:round(j[k],1) for k in ['cuda_init_ms','kernel_load_ms','ring_wait_ms','load_queue_ms','load_resident_ms','load_gb_per_s','first_forward_ms','first_token_ms'] if k in j}, 'fill_ms',round(u['fill_s']*1e3,1),'slot_waits_ms',round(u['wait_s']*1e3,1),'queue_ms',round(u['queue_s']*1e3,1),'first_group_ms',round(u['first_group_s']*1e3,1), 'early_MB', round(j.get('early_read_bytes',0)/1e6), [(t['test'],round(t['tokens_per_second'],1)) for t in j['tests']])
        if rs: print('  median', pat, v, 'load GB/s', round(st.median([j['load_gb_per_s'] for j in rs]),1), 'first token ms', round(st.median([j['first_token_ms'] for j in rs])))
PY
tar czf $OUT/json.tgz -C $J .
