"""Probe: every step of the offline bench run (64 chat requests) in the in-process
engine, bfloat16: its tokens, decode rows, forward and sampling time and the wall
time between steps. Usage: python step_timeline.py [bench|smollm2] [out.json]"""
import json
import sys
import time

import numpy as np

from llmesh.benchmarks import cpu_runtime
from llmesh.services.executor import runner as runner_mod

steps = []
_finish = runner_mod.ModelRunner._finish


def timed(self, p):
    t0 = time.perf_counter()
    result = _finish(self, p)
    if p.meta is not None:
        steps.append({"t": t0, "tokens": p.num_tokens,
                      "single": int(p.meta.num_single) or sum(g.num_rows for g in p.meta.groups),
                      "prefills": len(p.meta.prefills),
                      "forward_ms": result.forward_s * 1e3, "sample_ms": result.sample_s * 1e3,
                      "kernel": p.kernel})
    return result


runner_mod.ModelRunner._finish = timed
model = sys.argv[1] if len(sys.argv) > 1 else "bench"
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/timeline.json"
sys.argv = ["cpu_runtime", "--model", model, "--variants", "bf16", "--single-requests", "1",
            "--rounds", "1", "--ttft-prompts", "0"]
from llmesh.benchmarks import kit
kit.main(cpu_runtime.SPEC)
json.dump(steps, open(out, "w"))
