# scheduler alone, before (HEAD worktree) and after, alternating, 3 rounds
for r in 1 2 3; do
  for t in /tmp/s11/before /work/main; do
    echo "== round $r: $t"; (cd $t && PYTHONPATH=$t /work/main/.venv/bin/python /tmp/s11/sched_bench.py)
  done
done
