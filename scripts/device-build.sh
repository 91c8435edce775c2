#!/usr/bin/env bash
# Builds every GPU test here (release, feature `gpu-tests`, no hip) and stages what the GPU
# machine needs into .device/ (git-ignored), so that one device `run` does the check:
#
#   scripts/device-build.sh                  # here: build + stage (.device/, .device-model*/)
#   run carry [".device-model"]    bash .device-model/stash.sh      # call 1: 40 MiB of SmolLM2
#   run carry [".device-model-2"]  bash .device-model-2/stash.sh    # call 2: 40 MiB more
#   run carry [".device"]          bash .device/device-check.sh     # call 3: the rest + tests
#   (each call within 30 s of the last, while the machine stays warm)
#
# The GPU machine has no cargo and the carry limit is 64 MiB with the working tree (~24 MB),
# less than SmolLM2 (98 MB) plus the executables: the model travels split, its first part in
# calls 1 and 2 (kept outside the repository copy), the rest with the executables in call 3,
# where device-check.sh joins the parts and checks the sha256. Without calls 1-2 the SmolLM2
# tests fail (they say the model is missing); the rest still run. `--no-model` stages none.
#
# `--gemma` adds the Gemma 3 270M golden test on the GPU (actors/tests/gpu_gemma3.rs) and stages
# models/gemma-3-270m-q4_k_m.gguf (241 MiB) in chunks, .device-gemma-1 .. -7, one call each
# before the others (`bash .device-gemma-N/stash.sh`, each within 30 s of the last); the last
# call's device-check.sh checks the joined file's sha256 against the one staged here.
#
# Environment: CARGO_TARGET_DIR as for any build; DEVICE_DIR (default .device).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV="${DEVICE_DIR:-$ROOT/.device}"
MODEL_DIR="$ROOT/.device-model"
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's first part goes in two calls of CHUNK_BYTES each (.device-model, .device-model-2),
# the rest rides with the executables: every call also carries the working tree (~24 MB with
# the tiny-family test data), so each chunk is what the 64 MiB carry leaves beside the tree.
tree_mb=$(( $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) / 1048576 + 1 ))
CHUNK_BYTES=$(( (60 - tree_mb) * 1024 * 1024 ))
PART1_BYTES=$((2 * CHUNK_BYTES))
MODEL_DIR2="$ROOT/.device-model-2"
with_model=1
with_gemma=0
for arg in "$@"; do
    case "$arg" in
        --no-model) with_model=0 ;;
        --gemma) with_gemma=1 ;;
        *) echo "device-build: unknown option $arg (--no-model, --gemma)" >&2; exit 2 ;;
    esac
done
GEMMA="$ROOT/models/gemma-3-270m-q4_k_m.gguf"

# The test executables with a GPU test, by crate. kernels_compile_nvrtc needs no device but
# checks the device machine's NVRTC (required there by the feature).
CORE_TESTS=(gpu_kernels gpu_gemm kernels_compile_nvrtc)
ACTORS_TESTS=(gpu_pipeline gpu_forward one_engine)
[ "$with_gemma" = 1 ] && ACTORS_TESTS+=(gpu_gemma3)

args=()
for t in "${CORE_TESTS[@]}" "${ACTORS_TESTS[@]}"; do args+=(--test "$t"); done
# One invocation for both crates: the library is built once with the same features, and the
# `rocmforge` binary the actors tests call (CARGO_BIN_EXE_rocmforge) comes with it.
json=$(mktemp)
trap 'rm -f "$json"' EXIT
cargo test --release --no-run --features gpu-tests -p rocmforge -p rocmforge-actors "${args[@]}" \
    --message-format=json-render-diagnostics > "$json"

rm -rf "$DEV" "$MODEL_DIR" "$MODEL_DIR2" "$ROOT"/.device-gemma-*
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
    mkdir -p "$MODEL_DIR" "$MODEL_DIR2"
    head -c "$CHUNK_BYTES" "$MODEL" > "$MODEL_DIR/smollm2.chunk"
    head -c "$PART1_BYTES" "$MODEL" | tail -c +"$((CHUNK_BYTES + 1))" > "$MODEL_DIR2/smollm2.chunk"
    tail -c +"$((PART1_BYTES + 1))" "$MODEL" > "$DEV/smollm2.part2"
    # Call 1 starts the first part, call 2 appends to it (outside the repository copy).
    cat > "$MODEL_DIR/stash.sh" <<'SH'
#!/usr/bin/env bash
# Call 1 of the device check: the first chunk of SmolLM2, kept outside the repository copy.
set -eu
mkdir -p /tmp/rocmforge-device
cp "$(dirname "$0")/smollm2.chunk" /tmp/rocmforge-device/smollm2.part1
ls -l /tmp/rocmforge-device
SH
    cat > "$MODEL_DIR2/stash.sh" <<'SH'
#!/usr/bin/env bash
# Call 2 of the device check: the second chunk of SmolLM2, appended to the first.
set -eu
cat "$(dirname "$0")/smollm2.chunk" >> /tmp/rocmforge-device/smollm2.part1
ls -l /tmp/rocmforge-device
SH
fi
gemma_dirs=()
if [ "$with_gemma" = 1 ]; then
    [ -f "$GEMMA" ] || ./scripts/fetch-gemma3.sh
    sha256sum "$GEMMA" | cut -d' ' -f1 > "$DEV/gemma3.sha256"
    size=$(stat -c %s "$GEMMA")
    n=$(( (size + CHUNK_BYTES - 1) / CHUNK_BYTES ))
    for i in $(seq 1 "$n"); do
        d="$ROOT/.device-gemma-$i"
        mkdir -p "$d"
        dd if="$GEMMA" of="$d/gemma3.chunk" bs="$CHUNK_BYTES" skip="$((i - 1))" count=1 status=none
        # The first chunk starts the file, the others append (outside the repository copy).
        op='>>'; [ "$i" = 1 ] && op='>'
        cat > "$d/stash.sh" <<SH
#!/usr/bin/env bash
# Gemma 3 270M for the device check, chunk $i of $n, kept outside the repository copy.
set -eu
mkdir -p /tmp/rocmforge-device
cat "\$(dirname "\$0")/gemma3.chunk" $op /tmp/rocmforge-device/gemma3.gguf
ls -l /tmp/rocmforge-device
SH
        gemma_dirs+=("$d")
    done
fi
# The device tool carries at most 64 MiB in all, the working tree included.
for d in "$DEV" "$MODEL_DIR" "$MODEL_DIR2" "${gemma_dirs[@]}"; do
    [ -d "$d" ] || continue
    size=$(du -sm "$d" | cut -f1)
    echo "$d: $size MiB (+ $tree_mb MiB of working tree)"
    [ "$((size + tree_mb))" -lt 62 ] || { echo "device-build: $d and the tree are over the 64 MiB carry limit" >&2; exit 1; }
done
for d in "${gemma_dirs[@]}"; do
    b=$(basename "$d")
    echo "first, each within 30 s of the last: run carry [\"$b\"] 'bash $b/stash.sh'"
done
echo "next, each within 30 s of the last: run carry [\".device-model\"] 'bash .device-model/stash.sh',"
echo "      run carry [\".device-model-2\"] 'bash .device-model-2/stash.sh',"
echo "      run carry [\".device\"] 'bash .device/device-check.sh'"
