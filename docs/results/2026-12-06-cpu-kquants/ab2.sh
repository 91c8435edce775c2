#!/usr/bin/env bash
# Q3_K throughput (q3k.jsonl): base (68e7e0e) against f89811d ("final3"), alternating. Its
# start-up loop was a first look; startup.json is the same `run -n 1` command timed from Python
# (time.perf_counter around subprocess.run), 10 alternating rounds of base against 34785fe.
set -u
cd /work/main
for r in 1 2 3 4 5; do
  for b in base final3; do
    for m in models/gemma-3-270m-q4_k_m.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf; do
      /usr/bin/time -f "startup $b $(basename $m) %e s %M KB" /tmp/rf-$b run -m $m --backend cpu -n 1 -q -p "Hi" 2>&1 >/dev/null | tail -1
    done
  done
done
for r in 1 2; do
  for b in base final3; do
    /tmp/rf-$b bench -m /tmp/synth-1b-q3_k.gguf --backend cpu -p 64 -n 16 -r 3 -t 2 -q --json 2>/dev/null | sed "s/^/q3k $b round$r /"
  done
done
