#!/bin/bash
# py-spy (sampling, every thread, idle excluded) of the executor and scheduler processes while
# step_overhead runs 256 sequences through the mesh (TP=1, straight to the scheduler)
OUT=$1; mkdir -p $OUT
SPY=/tmp/s11/pyspy/bin/py-spy; export PYTHONPATH=/tmp/s11/pyspy
.venv/bin/python -m llmesh.benchmarks.step_overhead --batch 256 --configs 1x2 --paths scheduler --rounds 1 --max-tokens 1500 --json $OUT/step.json > $OUT/step.log 2>&1 &
B=$!
for i in $(seq 1 120); do
  E=$(pgrep -f "llmesh.services.executor" | head -1); S=$(pgrep -f "llmesh.services.scheduler" | head -1)
  [ -n "$E" ] && [ -n "$S" ] && break; sleep 0.5
done
sleep 9
$SPY record -p $E -d 5 -r 250 -f raw -o $OUT/executor.txt --nonblocking > $OUT/spy-e.log 2>&1 &
$SPY record -p $S -d 5 -r 250 -f raw -o $OUT/scheduler.txt --nonblocking > $OUT/spy-s.log 2>&1 &
wait $B; wait
