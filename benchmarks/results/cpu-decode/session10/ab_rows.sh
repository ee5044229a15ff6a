#!/bin/bash
# The float32 kernel's row limit, 8 (the tree at $BEFORE, 4beee65) against 256 (this tree),
# served, 3 rounds alternating; bench model then SmolLM2.
cd "$(dirname "$0")/../../../.."
R=benchmarks/results/cpu-decode/session10
BEFORE=${BEFORE:-/tmp/s10/before}
for m in bench smollm2; do
  .venv/bin/python -m llmesh.benchmarks.ab --before $BEFORE --rounds 3 \
    --json $R/ab-rows-$m.json -- cpu_runtime --model $m --variants mesh-float32 \
    --single-requests 8 --rounds 1 > $R/ab-rows-$m.log 2>&1
done
