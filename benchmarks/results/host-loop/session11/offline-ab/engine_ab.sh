#!/bin/bash
# offline tiny, the in-process engine alone: before (worktree /tmp/s11/before) and after, 5 rounds alternating
set -e
OUT=$(cd "$(dirname "$0")" && pwd)
for r in 1 2 3 4 5; do
  if [ $((r % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
  for t in $order; do
    if [ $t = before ]; then dir=/tmp/s11/before; else dir=/work/main; fi
    (cd $dir && /work/main/.venv/bin/python -m llmesh.mesh.cli bench offline --model /root/.cache/llmesh/models/tiny --targets engine --num-requests 256 --json $OUT/engine-tiny-$t-$r.json > $OUT/engine-tiny-$t-$r.log 2>&1)
    /work/main/.venv/bin/python -c "
import json; d = json.load(open('$OUT/engine-tiny-$t-$r.json')); run = d['runs'][0]['targets']
print('$t', $r, {k: round(v['output_tokens_per_s']) for k, v in run.items()})"
  done
done
