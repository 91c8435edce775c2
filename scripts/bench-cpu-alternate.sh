#!/usr/bin/env bash
# CPU throughput of several builds in alternating rounds (docs/PERFORMANCE.md, "CPU one engine"):
# each round runs `rocmforge bench --backend cpu` once per build, in the order given, so slow
# drifts of a shared machine's load fall on every build alike. The load average before each
# run is kept beside its JSON.
#
#   bench-cpu-alternate.sh ROUNDS LABEL=BIN [LABEL=BIN ...] [-- BENCH ARGS]
#
# BENCH ARGS default to `-t 2 -p 0 -n 64 -r 5` on the default model (SmolLM2-135M Q4_1).
# Writes $OUT/rN-LABEL.json ($OUT defaults to ./bench-out) and prints, per build and test, the
# median over rounds of each run's median, the spread of the rounds, and the load range.
set -eu
ROUNDS=$1
shift
BUILDS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    BUILDS+=("$1")
    shift
done
[ $# -gt 0 ] && shift
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(-t 2 -p 0 -n 64 -r 5)
OUT=${OUT:-./bench-out}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
for r in $(seq "$ROUNDS"); do
    for b in "${BUILDS[@]}"; do
        label=${b%%=*}
        bin=${b#*=}
        load=$(cut -d' ' -f1 /proc/loadavg)
        json=$("$bin" bench --backend cpu -m "$MODEL" "${ARGS[@]}" --json 2>/dev/null | tail -1)
        printf '{"round": %d, "build": "%s", "load1": %s, "results": %s}\n' \
            "$r" "$label" "$load" "$json" > "$OUT/r$r-$label.json"
        echo "round $r $label load $load: $(python3 -c 'import json,sys; print(" ".join("%s %.1f" % (t["test"], t["tokens_per_second"]) for t in json.load(sys.stdin)["results"]))' < "$OUT/r$r-$label.json")"
    done
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
runs = [json.load(open(f)) for f in glob.glob(os.path.join(sys.argv[1], "r*.json"))]
by = {}
for run in runs:
    for t in run["results"]:
        by.setdefault((run["build"], t["test"]), []).append((t["tokens_per_second"], run["load1"]))
for (build, test), v in sorted(by.items()):
    tps = [x for x, _ in v]
    loads = [l for _, l in v]
    print(f"{build:>12} {test:>6}: median {statistics.median(tps):7.1f} tok/s "
          f"(rounds {min(tps):.1f}-{max(tps):.1f}, n={len(tps)}), load {min(loads)}-{max(loads)}")
PY
