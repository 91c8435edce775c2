#!/usr/bin/env bash
# Start-up diagnosis (issue 12): process wall of `run -n 1` against the runtime's own timings.
# Run on the GPU machine after device-ab.sh (same warm machine): copy it into .device-ab/ and
# run carry [".device-ab"] 'bash .device-ab/startup-diag.sh'. Appends to $OUT/startup.txt.
W=/tmp/rocmforge-device; NEW=$W/bin/rocmforge; OUT=${OUT:-/tmp/out}; M=$W/8b-q4_0.gguf
export ROCMFORGE_KERNEL_CACHE=$W/kernels-ab
ms() { echo $(( $(date +%s%N) / 1000000 )); }
for i in 1 2 3; do s=$(ms); "$NEW" --version > /dev/null 2>&1; echo "version wall $(( $(ms) - s )) ms"; done | tee -a "$OUT/startup.txt"
for i in 1 2 3 4 5; do
  s=$(ms); "$NEW" run --backend cuda -m "$M" --prompt Hello -n 1 --temp 0 --json > /tmp/r.json 2>/dev/null; rc=$?; e=$(ms)
  python3 -c "import json;j=json.load(open('/tmp/r.json'))['timings'];print('warm run wall $(( e - s )) ms rc=$rc open %.0f first %.0f total %.0f'%(j['open_ms'],j['first_token_ms'],j['total_ms']))" | tee -a "$OUT/startup.txt"
done
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(ms); "$NEW" run --backend cuda -m "$M" --prompt Hello -n 1 --temp 0 --json > /tmp/r.json 2>/dev/null; e=$(ms)
python3 -c "import json;j=json.load(open('/tmp/r.json'))['timings'];print('cold run wall $(( e - s )) ms open %.0f first %.0f total %.0f'%(j['open_ms'],j['first_token_ms'],j['total_ms']))" | tee -a "$OUT/startup.txt"
