#!/bin/bash
# The CPU decode kernel served, side by side in one run: the mesh in bfloat16 with the
# kernel (mesh-bfloat16) and without it (mesh-bfloat16-eager), llama-server bf16 at the
# mesh's concurrency (64 slots) and at its best (16), and float32 on both sides; 3 rounds,
# the order reversed every other round.
cd "$(dirname "$0")/../../../.."
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model bench \
  --variants mesh-bfloat16,mesh-bfloat16-eager,llama.cpp-bf16,llama.cpp-bf16-np16,mesh-float32,llama.cpp-f32 \
  --single-requests 8 --rounds 3 --json benchmarks/results/cpu-decode/kernel/bench.json
