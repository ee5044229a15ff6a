#!/bin/bash
# Tenth session, the last tree: llmesh's float32 and bfloat16 meshes against llama-server f32
# and bf16 (64 slots and 16), bench model and SmolLM2, 3 rounds, the order reversed every
# other round.
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session10/final
mkdir -p $R
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model bench \
  --variants mesh-float32,llama.cpp-f32,llama.cpp-f32-np16,mesh-bfloat16,llama.cpp-bf16-np16 \
  --single-requests 8 --rounds 3 --json $R/bench.json > $R/bench.log 2>&1
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 \
  --variants mesh-float32,llama.cpp-f32-np16,mesh-bfloat16,llama.cpp-bf16-np16 \
  --single-requests 8 --rounds 3 --json $R/smollm2.json > $R/smollm2.log 2>&1
