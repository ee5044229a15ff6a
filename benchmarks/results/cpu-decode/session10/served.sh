#!/bin/bash
# Tenth session: the float32 decode kernel served. llmesh's float32 mesh with the kernel
# (mesh-float32) and without it (mesh-float32-eager, engine.cpu_decode_kernel: false)
# against llama-server f32 at the mesh's concurrency (64 slots) and at 16, bench model and
# SmolLM2, 3 rounds, the order reversed every other round.
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session10
V=mesh-float32,mesh-float32-eager,llama.cpp-f32,llama.cpp-f32-np16
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model bench --variants $V \
  --single-requests 8 --rounds 3 --json $R/bench.json > $R/bench.log 2>&1
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 --variants $V \
  --single-requests 8 --rounds 3 --json $R/smollm2.json > $R/smollm2.log 2>&1
