#!/bin/bash
# Probe: the float32 kernel's one-row steps on both threads (a worktree of this tree whose
# StepThreads never takes a thread off: $TWO, "before" in the report) against one thread
# fewer for small steps (this tree, "after"), served float32, 3 rounds alternating.
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session10
TWO=${TWO:-/tmp/s10/twothreads}
for m in smollm2 bench; do
  .venv/bin/python -m llmesh.benchmarks.ab --before $TWO --rounds 3 \
    --json $R/ab-two-threads-$m.json -- cpu_runtime --model $m --variants mesh-float32 \
    --single-requests 8 --rounds 1 > $R/ab-two-threads-$m.log 2>&1
done
