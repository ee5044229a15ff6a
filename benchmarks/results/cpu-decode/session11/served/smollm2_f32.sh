#!/bin/bash
# Eleventh session, the final tree (code of 90177ce): SmolLM2 float32, the mesh against
# llama-server f32 at 16 slots, 3 rounds, the order reversed every other round.
cd "$(dirname "$0")/../../../../.."
R=benchmarks/results/cpu-decode/session11/served
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 \
  --variants mesh-float32,llama.cpp-f32-np16 \
  --single-requests 8 --rounds 3 --json $R/smollm2-f32.json > $R/smollm2-f32.log 2>&1
