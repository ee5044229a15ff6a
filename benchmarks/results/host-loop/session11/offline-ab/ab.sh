#!/bin/bash
# llmesh bench offline on the tiny model, 256 requests, the tree before this session's
# scheduler work (a worktree of ae28eb6 at /tmp/s11/before) and this one, rounds
# alternating which goes first. Run as:
#   ab.sh engine,mesh 3 offline-tiny   (ab.out)
#   ab.sh engine 5 engine-tiny         (engine-ab.out)
set -e
targets=$1; rounds=$2; name=$3
here=$(cd "$(dirname "$0")" && pwd)
py=/work/main/.venv/bin/python
trees=(before after)
for r in $(seq 1 "$rounds"); do
  [ $((r % 2)) -eq 0 ] && trees=(after before) || trees=(before after)
  for t in "${trees[@]}"; do
    dir=/work/main; [ "$t" = before ] && dir=/tmp/s11/before
    json=$here/$name-$t-$r.json
    (cd $dir && $py -m llmesh.mesh.cli bench offline --model /root/.cache/llmesh/models/tiny \
      --targets "$targets" --num-requests 256 --json "$json" > "${json%.json}.log" 2>&1)
    $py - "$json" "$t" "$r" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["runs"][0]["targets"]
rates = {k: round(v["output_tokens_per_s"]) for k, v in run.items()}
ratio = f" ratio {rates['mesh'] / rates['engine']:.2f}" if "mesh" in rates else ""
print(sys.argv[2], sys.argv[3], rates, ratio)
PY
  done
done
