#!/bin/bash
set -eu
H=/tmp/mm; mkdir -p $H
cp .device/sm1/smpartaa $H/
tar xJf .device/final/bins.tar.xz -C $H
B=$H/bins
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$B/rocmforge synth --preset 8b --qtype q4_0 --tokenizer-from .device/final/smollm2-tokenizer.gguf --out $H/s8b.gguf 2>&1 | tail -1
$B/rocmforge synth --preset 1b --qtype q4_0 --tokenizer-from .device/final/smollm2-tokenizer.gguf --out $H/s1b.gguf 2>&1 | tail -1
sync
ls -la $H
