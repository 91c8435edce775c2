#!/usr/bin/env bash
# Compiles every kernel in kernels/ to AMD code objects with `hipcc --genco`, for each target in
# $ARCHS (default: gfx90a gfx1030). An independent cross-check of the runtime path (hipRTC, see
# src/backend/hip/hiprtc.rs) and a way to get offline code objects. Needs no GPU.
#
#   scripts/hip-compile-kernels.sh [OUT_DIR]        (default OUT_DIR: target/hip-kernels)
#   ARCHS="gfx90a gfx942" scripts/hip-compile-kernels.sh
#
# Device libraries: $ROCM_DEVICE_LIB_PATH, else the Debian location, else hipcc's default.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/hip-kernels}"
archs="${ARCHS:-gfx90a gfx1030}"
command -v hipcc >/dev/null || { echo "hipcc not found (apt-get install hipcc libamdhip64-dev rocm-device-libs)" >&2; exit 2; }
libs=()
if [[ -n "${ROCM_DEVICE_LIB_PATH:-}" ]]; then
  libs=(--rocm-device-lib-path="$ROCM_DEVICE_LIB_PATH")
elif [[ -d /usr/lib/x86_64-linux-gnu/amdgcn/bitcode ]]; then
  libs=(--rocm-device-lib-path=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode)
fi
mkdir -p "$out"
fail=0
for src in kernels/*.cu; do
  for arch in $archs; do
    obj="$out/$(basename "${src%.cu}")-$arch.co"
    # hipcc probes for a GPU with rocm_agent_enumerator even when --offload-arch is given; on a
    # machine without one that prints a harmless traceback, filtered out here.
    if log=$(hipcc --genco --offload-arch="$arch" "${libs[@]}" -O3 -std=c++17 -x hip "$src" -o "$obj" 2>&1); then
      echo "ok   $arch $src -> $obj ($(stat -c %s "$obj") bytes)"
    else
      echo "FAIL $arch $src" >&2
      grep -v -e rocm_agent_enumerator -e Traceback -e '^  File ' -e '^    ' -e FileNotFoundError <<<"$log" >&2 || true
      fail=1
    fi
  done
done
exit $fail
