#!/bin/bash
# Eighth session: llmesh's bf16 mesh (CPU decode kernel) against llama-server bf16 at the
# mesh's concurrency (64 slots) and at its best (16), bench model and SmolLM2, 3 rounds, the
# order reversed every other round; then the tree before the session (15c6baa, a worktree)
# against this one on the mesh alone (ab-*.json).
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session8
RUN=${RUN:-}  # a suffix for the results files ("-run1": before the prefill attention)
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model bench \
  --variants mesh-bfloat16,llama.cpp-bf16,llama.cpp-bf16-np16 \
  --single-requests 8 --rounds 3 --json $R/bench$RUN.json > $R/bench$RUN.log 2>&1
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 \
  --variants mesh-bfloat16,llama.cpp-bf16,llama.cpp-bf16-np16 \
  --single-requests 8 --rounds 3 --json $R/smollm2$RUN.json > $R/smollm2$RUN.log 2>&1
