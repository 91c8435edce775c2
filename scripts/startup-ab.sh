#!/usr/bin/env bash
# Start-up A/B on a fresh GPU machine (issue 12): `run -n 1 --json` of two builds interleaved,
# process wall beside the runtime's own open / first-token / end times. Self-contained: both
# builds travel xz-compressed beside this script (rocmforge.xz = old, rocmforge-new.xz = new),
# the 8B-shape Q4_0 model is made here with `synth`.
# Here: strip -o /tmp/rf target/release/rocmforge of each build, xz them into .device-ab/
# (rocmforge.xz = old, rocmforge-new.xz = new) with tok.gguf (see device-ab.sh), then
#   run carry [".device-ab"] 'bash .device-ab/startup-ab.sh'  (copy this script there first)
set -u
D="$(cd "$(dirname "$0")" && pwd)"; W=/tmp/rf-su; OUT=${OUT:-/tmp/out}; mkdir -p "$W" "$OUT"
xz -dc "$D/rocmforge.xz" > "$W/old"; xz -dc "$D/rocmforge-new.xz" > "$W/new"; chmod +x "$W/old" "$W/new"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/startup-ab.txt"
[ -f "$W/8b.gguf" ] || "$W/new" synth --preset 8b --qtype q4_0 --tokenizer-from "$D/tok.gguf" --out "$W/8b.gguf" > /dev/null 2>&1 || { echo "synth failed"; exit 1; }
cat "$W/8b.gguf" > /dev/null
export ROCMFORGE_KERNEL_CACHE=$W/kc
for b in new old; do "$W/$b" run --backend cuda -m "$W/8b.gguf" --prompt Hello -n 1 --temp 0 > /dev/null 2>&1; done
ms() { echo $(( $(date +%s%N) / 1000000 )); }
for i in 1 2 3 4 5; do for b in new old; do
  s=$(ms); "$W/$b" run --backend cuda -m "$W/8b.gguf" --prompt Hello -n 1 --temp 0 --json > "$W/r.json" 2>/dev/null; rc=$?; e=$(ms)
  python3 -c "import json;j=json.load(open('$W/r.json'))['timings'];print('$b round $i wall $(( e - s )) ms rc=$rc open %.0f first %.0f total %.0f'%(j['open_ms'],j['first_token_ms'],j['total_ms']))" | tee -a "$OUT/startup-ab.txt"
done; done
