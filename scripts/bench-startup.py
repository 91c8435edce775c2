#!/usr/bin/env python3
"""Start-up of several builds in alternating rounds: the process wall of
`rocmforge run --backend cpu -n 1 -q -p Hi` (page cache warm), timed around the process.

    scripts/bench-startup.py ROUNDS MODEL LABEL=BIN [LABEL=BIN ...] > startup.json

Prints the JSON {model: {label: [ms, ...]}} on stdout and each build's median on stderr.
"""
import json
import statistics
import subprocess
import sys
import time

rounds, model, builds = int(sys.argv[1]), sys.argv[2], [b.split("=", 1) for b in sys.argv[3:]]
times = {label: [] for label, _ in builds}
for _ in range(rounds):
    for label, binary in builds:
        t = time.perf_counter()
        subprocess.run(
            [binary, "run", "-m", model, "--backend", "cpu", "-n", "1", "-q", "-p", "Hi"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        times[label].append(round(1000 * (time.perf_counter() - t), 1))
for label, v in times.items():
    print(f"{label}: median {statistics.median(v)} ms, {min(v)}-{max(v)}", file=sys.stderr)
json.dump({model: times}, sys.stdout)
print()
