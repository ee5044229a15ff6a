#!/bin/bash
# in-process TTFT-512 (ttft_probe.py), the tree before the float32 prefill attention (a worktree
# of 90177ce at /tmp/s11/before2) and with it (788d450), 3 rounds alternating, SmolLM2 and bench
here=$(cd "$(dirname "$0")" && pwd)
for r in 1 2 3; do
  [ $((r % 2)) -eq 0 ] && trees="after before" || trees="before after"
  for t in $trees; do
    dir=/work/main; [ "$t" = before ] && dir=/tmp/s11/before2
    for m in smollm2 bench; do
      echo -n "round $r $t: "; (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python $here/ttft_probe.py $m float32 2>&1 | grep TTFT)
    done
  done
done
