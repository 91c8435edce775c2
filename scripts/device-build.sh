#!/usr/bin/env bash
# Builds every GPU test here (release, feature `gpu-tests`, no hip) and stages what the GPU
# machine needs into .device/ (git-ignored), so that one device `run` does the check:
#
#   scripts/device-build.sh                  # here: build + stage (.device/, .device-model/)
#   run carry [".device-model"]  bash .device-model/stash.sh        # call 1: half of SmolLM2
#   run carry [".device"]        bash .device/device-check.sh       # call 2, within 30 s
#
# The GPU machine has no cargo and the carry limit is 64 MiB, less than SmolLM2 (98 MB) plus the
# executables: the model travels split, its first part in call 1 (kept outside the repository
# while the machine stays warm, about 30 s), the rest with the executables in call 2, where
# device-check.sh joins the parts and checks the sha256. Without call 1 the SmolLM2 tests fail
# (they say the model is missing); the rest still run. `--no-model` stages no model part.
#
# Environment: CARGO_TARGET_DIR as for any build; DEVICE_DIR (default .device).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV="${DEVICE_DIR:-$ROOT/.device}"
MODEL_DIR="$ROOT/.device-model"
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# First part of the model (call 1); the rest rides with the executables (call 2).
PART1_BYTES=$((56 * 1024 * 1024))
with_model=1
[ "${1:-}" = "--no-model" ] && with_model=0

# The test executables with a GPU test, by crate. kernels_compile_nvrtc needs no device but
# checks the device machine's NVRTC (required there by the feature).
CORE_TESTS=(gpu_kernels gpu_gemm kernels_compile_nvrtc)
ACTORS_TESTS=(gpu_pipeline gpu_forward)

args=()
for t in "${CORE_TESTS[@]}" "${ACTORS_TESTS[@]}"; do args+=(--test "$t"); done
# One invocation for both crates: the library is built once with the same features, and the
# `rocmforge` binary the actors tests call (CARGO_BIN_EXE_rocmforge) comes with it.
json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --no-run --features gpu-tests -p rocmforge -p rocmforge-actors "${args[@]}" \
    --message-format=json-render-diagnostics > "$json"

rm -rf "$DEV" "$MODEL_DIR"
mkdir -p "$DEV"
stage=$(mktemp -d)
trap 'rm -rf "$json" "$stage"' EXIT
mkdir "$stage/bin"
python3 - "$json" "$stage/bin" <<'PY'
import json, shutil, sys, os
src, dst = sys.argv[1], sys.argv[2]
seen = {}
for line in open(src):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if m["profile"]["test"] and "test" in t["kind"]:
        seen[t["name"]] = m["executable"]
    elif t["kind"] == ["bin"] and t["name"] == "rocmforge":
        seen["rocmforge"] = m["executable"]
for name, exe in sorted(seen.items()):
    shutil.copy(exe, os.path.join(dst, name))
    print(f"staged {name} <- {exe}")
PY
for t in "${CORE_TESTS[@]}" "${ACTORS_TESTS[@]}" rocmforge; do
    [ -x "$stage/bin/$t" ] || { echo "device-build: $t was not built" >&2; exit 1; }
done
# Stripped and compressed: the executables share the 64 MiB carry with half of the model.
strip "$stage"/bin/*
tar -C "$stage" -cJf "$DEV/bin.tar.xz" bin
printf '%s\n' "${CORE_TESTS[@]}" "${ACTORS_TESTS[@]}" > "$DEV/tests.txt"
# Paths compiled into the executables: gpu_pipeline runs the CLI at CARGO_BIN_EXE_rocmforge.
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "BUILD_BIN_EXE=$target_dir/release/rocmforge" > "$DEV/paths.env"
cp scripts/device-check.sh "$DEV/"

if [ "$with_model" = 1 ]; then
    [ -f "$MODEL" ] || ./scripts/fetch-model.sh
    mkdir -p "$MODEL_DIR"
    head -c "$PART1_BYTES" "$MODEL" > "$MODEL_DIR/smollm2.part1"
    tail -c +"$((PART1_BYTES + 1))" "$MODEL" > "$DEV/smollm2.part2"
    cat > "$MODEL_DIR/stash.sh" <<'SH'
#!/usr/bin/env bash
# Call 1 of the device check: keeps the first part of SmolLM2 outside the repository copy.
set -eu
mkdir -p /tmp/rocmforge-device
cp "$(dirname "$0")/smollm2.part1" /tmp/rocmforge-device/
ls -l /tmp/rocmforge-device
SH
fi
# The device tool carries at most 64 MiB in all.
for d in "$DEV" "$MODEL_DIR"; do
    [ -d "$d" ] || continue
    size=$(du -sm "$d" | cut -f1)
    echo "$d: $size MiB"
    [ "$size" -lt 62 ] || { echo "device-build: $d is over the 64 MiB carry limit" >&2; exit 1; }
done
echo "next: run carry [\".device-model\"] 'bash .device-model/stash.sh', then within 30 s"
echo "      run carry [\".device\"] 'bash .device/device-check.sh'"
