#!/bin/bash
# the bench model offline, mesh against the in-process engine in the same run, 3 runs (tree 7e09ecb)
here=$(cd "$(dirname "$0")" && pwd)
for r in 1 2 3; do
  /work/main/.venv/bin/python -m llmesh.mesh.cli bench offline --model /root/.cache/llmesh/models/bench --targets engine,mesh \
    --num-requests 256 --json $here/bench-$r.json > $here/bench-$r.log 2>&1
  /work/main/.venv/bin/python -c "
import json; run = json.load(open('$here/bench-$r.json'))['runs'][0]['targets']
print($r, {k: round(v['output_tokens_per_s'], 1) for k, v in run.items()}, 'mesh / engine %.3f' % (run['mesh']['output_tokens_per_s'] / run['engine']['output_tokens_per_s']))"
done
