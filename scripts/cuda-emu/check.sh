#!/usr/bin/env bash
# Runs the project's own CUDA kernels on the CPU (cuda_emu.h stands in for the GPU) against
# references, for sessions without a GPU: indexing, reductions and arithmetic are checked;
# launches from Rust, timing and real-GPU math libraries are not (scripts/gpu-check.sh is).
# Usage: bash scripts/cuda-emu/check.sh        (needs g++ with C++20)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/orpo-cuda-emu"
mkdir -p "$out"
status=0
for src in "$here"/*_check.cpp; do
  name="$(basename "$src" .cpp)"
  g++ -std=c++20 -O2 -pthread -I"$here/include" -include cuda_emu.h -x c++ "$src" -o "$out/$name"
  echo "== $name"
  "$out/$name" || status=1
done
exit $status
