#!/bin/bash
# Ninth session: llmesh's bf16 mesh against llama-server bf16 at the mesh's concurrency (64
# slots) and at its best (16), bench model (with float32 on both sides too) and SmolLM2, 3
# rounds, the order reversed every other round; then the tree before the session (db151cb,
# a worktree at $BEFORE) against this one on the bench mesh alone.
# RUN=run1: the first run (before the element-wise ops); the last run writes to session9/.
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session9${RUN:+/$RUN}
BEFORE=${BEFORE:-/tmp/s9/before}
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model bench \
  --variants mesh-bfloat16,llama.cpp-bf16,llama.cpp-bf16-np16,mesh-float32,llama.cpp-f32 \
  --single-requests 8 --rounds 3 --json $R/bench.json > $R/bench.log 2>&1
.venv/bin/python -m llmesh.benchmarks.cpu_runtime --model smollm2 \
  --variants mesh-bfloat16,llama.cpp-bf16,llama.cpp-bf16-np16 \
  --single-requests 8 --rounds 3 --json $R/smollm2.json > $R/smollm2.log 2>&1
.venv/bin/python -m llmesh.benchmarks.ab --before $BEFORE --rounds 3 \
  --json $R/ab-session-bench.json -- cpu_runtime --model bench --variants mesh-bfloat16 \
  --single-requests 8 --rounds 1 > $R/ab-session-bench.log 2>&1
