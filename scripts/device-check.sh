#!/usr/bin/env bash
# Runs every GPU test on the GPU machine and fails unless each one ran and passed.
#
# Build and stage here with scripts/device-build.sh (release test executables with the
# `gpu-tests` feature, this script, half of SmolLM2 in .device/, the other half in
# .device-model/), then on the device, the second call within 30 s of the first:
#   run carry [".device-model"]  bash .device-model/stash.sh
#   run carry [".device"]        bash .device/device-check.sh
#
# Each executable runs with --include-ignored: nothing may be ignored, nothing may fail, and its
# libtest summary (`test result: ... N passed; M failed; K ignored`) must be there. Logs, one per
# executable, and summary.txt go to $OUT; the summary is printed. Models: ROCMFORGE_TEST_MODEL
# if set, else SmolLM2 joined from the two parts (sha256 checked); ROCMFORGE_SYNTH_MODEL if set,
# else a synthetic 1B Q4_0 made here with `rocmforge synth` (SmolLM2's tokenizer).
set -u
DEV_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$DEV_DIR/.." && pwd)"
OUT="${OUT:-$REPO/device-out}"
WORK="${DEVICE_WORK:-/tmp/rocmforge-device}"
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# Per executable; gpu_forward (CPU oracle included) takes ~2 min on the H100.
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
mkdir -p "$OUT" "$WORK"
notes=()

BIN="$WORK/bin"
rm -rf "$BIN"
tar -xJf "$DEV_DIR/bin.tar.xz" -C "$WORK" || { echo "no $DEV_DIR/bin.tar.xz: run scripts/device-build.sh"; exit 1; }
export ROCMFORGE_KERNEL_CACHE="$WORK/kernels"
export ROCMFORGE_TEST_DATA="$REPO/tests/data"
# gpu_pipeline runs the CLI at the path it was built with.
if [ -f "$DEV_DIR/paths.env" ]; then
    . "$DEV_DIR/paths.env"
    if [ -n "${BUILD_BIN_EXE:-}" ] && [ ! -e "$BUILD_BIN_EXE" ]; then
        mkdir -p "$(dirname "$BUILD_BIN_EXE")" && ln -s "$BIN/rocmforge" "$BUILD_BIN_EXE"
    fi
fi

if [ -z "${ROCMFORGE_TEST_MODEL:-}" ]; then
    if [ -f "$WORK/smollm2.part1" ] && [ -f "$DEV_DIR/smollm2.part2" ]; then
        cat "$WORK/smollm2.part1" "$DEV_DIR/smollm2.part2" > "$WORK/smollm2.gguf"
        if echo "$SMOLLM2_SHA256  $WORK/smollm2.gguf" | sha256sum -c --quiet - ; then
            export ROCMFORGE_TEST_MODEL="$WORK/smollm2.gguf"
        else
            notes+=("SmolLM2 parts joined to a wrong sha256: the SmolLM2 tests will fail")
        fi
    else
        notes+=("SmolLM2 not here (call 1, .device-model/stash.sh, not run within 30 s?): the SmolLM2 tests will fail")
    fi
fi
# Gemma 3 270M, staged only by `scripts/device-build.sh --gemma` (which lists gpu_gemma3).
if [ -z "${ROCMFORGE_GEMMA3_MODEL:-}" ] && [ -f "$DEV_DIR/gemma3.sha256" ]; then
    if echo "$(cat "$DEV_DIR/gemma3.sha256")  $WORK/gemma3.gguf" | sha256sum -c --quiet - ; then
        export ROCMFORGE_GEMMA3_MODEL="$WORK/gemma3.gguf"
    else
        notes+=("Gemma 3 chunks missing or joined to a wrong sha256 (.device-gemma-N/stash.sh not all run within 30 s?): gpu_gemma3 will fail")
    fi
fi
if [ -z "${ROCMFORGE_SYNTH_MODEL:-}" ]; then
    tok=()
    [ -n "${ROCMFORGE_TEST_MODEL:-}" ] && tok=(--tokenizer-from "$ROCMFORGE_TEST_MODEL")
    if "$BIN/rocmforge" synth --preset 1b --qtype q4_0 "${tok[@]}" --out "$WORK/synth-1b.gguf" \
        > "$OUT/synth.txt" 2>&1; then
        export ROCMFORGE_SYNTH_MODEL="$WORK/synth-1b.gguf"
    else
        notes+=("rocmforge synth failed (synth.txt): synth_cuda_matches_cpu will fail")
    fi
fi

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    ls -l /usr/local/cuda/lib64/libnvrtc.so* 2>&1 | head -3
    echo "ROCMFORGE_TEST_MODEL=${ROCMFORGE_TEST_MODEL:-} ROCMFORGE_SYNTH_MODEL=${ROCMFORGE_SYNTH_MODEL:-} ROCMFORGE_GEMMA3_MODEL=${ROCMFORGE_GEMMA3_MODEL:-}"
} > "$OUT/env.txt"

# Runs one executable with every test included; appends a summary row; returns non-zero unless
# it exited 0 with a libtest summary of >0 passed, 0 failed, 0 ignored.
rows=()
run_one() {
    local label=$1 exe=$2 log="$OUT/$1.txt"
    timeout "$TEST_TIMEOUT" "$BIN/$exe" --include-ignored --test-threads=1 --nocapture > "$log" 2>&1
    local rc=$?
    # A harness may print several summaries (none here); sum them.
    local counts
    counts=$(grep -E '^test result: ' "$log" | awk '
        { for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed;?$/) p += $i
            if ($(i+1) ~ /^failed;?$/) f += $i
            if ($(i+1) ~ /^ignored;?$/) g += $i } n++ }
        END { if (n) printf "%d %d %d", p, f, g }')
    local verdict=ok passed=- failed=- ignored=-
    if [ -z "$counts" ]; then
        verdict="NO SUMMARY (rc $rc)"
    else
        read -r passed failed ignored <<< "$counts"
        if [ "$rc" = 124 ]; then verdict="TIMEOUT";
        elif [ "$failed" != 0 ] || [ "$rc" != 0 ]; then verdict="FAILED (rc $rc)";
        elif [ "$ignored" != 0 ]; then verdict="IGNORED TESTS";
        elif [ "$passed" = 0 ]; then verdict="NOTHING RAN"; fi
    fi
    rows+=("$(printf '%-28s %6s %6s %7s  %s' "$label" "$passed" "$failed" "$ignored" "$verdict")")
    [ "$verdict" = ok ]
}

rc=0
rm -rf "$ROCMFORGE_KERNEL_CACHE"
mapfile -t tests < "$DEV_DIR/tests.txt"
for t in "${tests[@]}"; do
    run_one "$t" "$t" || rc=1
done
# The kernel suite again, now from the disk cache the first run filled.
run_one gpu_kernels-warm-cache gpu_kernels || rc=1

{
    printf '%-28s %6s %6s %7s  %s\n' executable passed failed ignored verdict
    printf '%s\n' "${rows[@]}"
    for n in "${notes[@]}"; do echo "note: $n"; done
    # Which tests failed, and the first line of each panic.
    grep -hE -A1 '^test .* FAILED$|panicked at' "$OUT"/*.txt 2>/dev/null | grep -v '^--$' | head -n 40
    if [ "$rc" = 0 ]; then echo "device-check: every GPU test ran and passed"; else echo "device-check: FAILED"; fi
} > "$OUT/summary.txt"
cat "$OUT/env.txt" "$OUT/summary.txt"
exit $rc
