#!/usr/bin/env bash
# Runs the whole test suite: installs the Python tools the tests call (gguf, numpy, the NVRTC
# wheels for the kernel compile check), fetches the test models (SmolLM2 98 MB, Gemma 3 270M
# 253 MB), then `cargo test --workspace`.
# Extra arguments go to cargo test (e.g. `scripts/test.sh -- --nocapture`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
./scripts/fetch-model.sh
./scripts/fetch-gemma3.sh
# The NVRTC wheel ships libnvrtc without a system-wide install; tell the loader where it is.
NVRTC_DIR=$(python3 - <<'PY' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
if spec and spec.submodule_search_locations:
    for base in spec.submodule_search_locations:
        d = os.path.join(base, "cuda_nvrtc", "lib")
        if os.path.isdir(d):
            print(d)
            break
PY
)
if [ -n "${NVRTC_DIR:-}" ]; then
    export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo test --workspace "$@"
