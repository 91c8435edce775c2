#!/usr/bin/env bash
# Runs the CUDA kernel checks on the GPU machine. Build here first:
#   cargo test --release --no-run -p rocmforge --test cuda_kernels --test kernels_compile_nvrtc
#   mkdir -p .device/cuda && cp <the two printed executables> .device/cuda/{cuda_kernels,kernels_compile_nvrtc}
#   strip .device/cuda/* ; cp scripts/device-check.sh .device/cuda/
# (in the checkout the device tool sends, i.e. the session's main checkout), then run
# `bash .device/cuda/device-check.sh` there with carry [".device"]. Logs go to $OUT.
set -u
DEV_DIR="${DEV_DIR:-$(cd "$(dirname "$0")" && pwd)}"
OUT="${OUT:-./device-out}"
mkdir -p "$OUT"
export ROCMFORGE_KERNEL_CACHE="${ROCMFORGE_KERNEL_CACHE:-/tmp/rocmforge-kernels}"
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  ls -l /usr/local/cuda/lib64/libnvrtc.so* 2>&1 | head -5
} > "$OUT/env.txt"
rc=0
# 1. NVRTC of this machine (CUDA 13) compiles every kernel for sm_80 / sm_90; a missing NVRTC fails.
ROCMFORGE_REQUIRE_NVRTC=1 "$DEV_DIR/kernels_compile_nvrtc" --nocapture > "$OUT/compile.txt" 2>&1 || rc=1
# 2. Every kernel vs the CPU reference (first run compiles, second run hits the disk cache).
rm -rf "$ROCMFORGE_KERNEL_CACHE"
"$DEV_DIR/cuda_kernels" --nocapture --test-threads=1 > "$OUT/kernels.txt" 2>&1 || rc=1
"$DEV_DIR/cuda_kernels" --nocapture --test-threads=1 > "$OUT/kernels-warm-cache.txt" 2>&1 || rc=1
ls -l "$ROCMFORGE_KERNEL_CACHE" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"; tail -n 80 "$OUT/kernels.txt"; grep -h "modules ready" "$OUT"/kernels*.txt; tail -n 12 "$OUT/compile.txt"
exit $rc
