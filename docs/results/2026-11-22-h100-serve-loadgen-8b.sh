#!/bin/bash
# Serving on the H100: the OpenAI server (in-process, loopback) over the pipelined runtime on
# CUDA, 8B-shape synthetic Q4_0 with SmolLM2's tokenizer; then the same on the CPU for contrast
# is skipped (16-core host, not the 2-core figure).
set -u
B=$PWD/.device/f2; W=/tmp/rfs; mkdir -p $W
export ROCMFORGE_KERNEL_CACHE=/tmp/rf-kc
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
$B/rocmforge synth --preset 8b --qtype q4_0 --tokenizer-from $B/smollm2-tokenizer.gguf --out $W/s8b.gguf 2>&1 | tail -1
echo "== loadgen, backend cuda, 8B"
timeout 400 $B/serve_loadgen $W/s8b.gguf --backend cuda --clients 1,8,32 --rounds 2 --max-tokens 16 2>&1 | grep -v "^$" | tail -15
echo "== json"
timeout 150 $B/serve_loadgen $W/s8b.gguf --backend cuda --clients 1,8,32 --rounds 1 --max-tokens 16 --json 2>/dev/null | tail -5
date -u
} 2>&1 | tee $OUT/serve.txt
