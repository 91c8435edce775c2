#!/usr/bin/env bash
# A/B: base (main before this session, 68e7e0e) vs final, alternating, 2 rounds.
set -u
cd /work/main
for r in 1 2; do
  for b in base final; do
    for m in models/gemma-3-270m-q4_k_m.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf; do
      /tmp/rf-$b bench -m $m --backend cpu -p 128 -n 32 -r 3 -t 2 -q --json 2>/dev/null | sed "s/^/$b round$r /"
    done
    for q in q4_k q5_k q6_k; do
      /tmp/rf-$b bench -m /tmp/synth-1b-$q.gguf --backend cpu -p 64 -n 16 -r 3 -t 2 -q --json 2>/dev/null | sed "s/^/$b round$r /"
    done
  done
done
