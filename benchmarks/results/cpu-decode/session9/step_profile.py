"""Probe: torch profiler over the offline bench run's decode steps of more than
32 rows (PREFILL=1: its steps with prefill chunks) (in-process engine, bfloat16);
prints the ops' split. Usage: [PREFILL=1] python step_profile.py [bench|smollm2]"""
import os
import sys

import torch
from torch.profiler import profile, ProfilerActivity

from llmesh.benchmarks import cpu_runtime, kit
from llmesh.services.executor import runner as runner_mod

_finish = runner_mod.ModelRunner._finish
prof = profile(activities=[ProfilerActivity.CPU])
LIMIT = 10 if os.environ.get("PREFILL") else 40
seen = {"n": 0, "rows": 0, "ms": 0.0}


def profiled(self, p):
    if os.environ.get("PREFILL"):
        big = p.meta is not None and bool(p.meta.prefills)
    else:
        big = p.meta is not None and not p.meta.prefills and p.num_tokens > 32
    if big and seen["n"] < LIMIT:
        prof.start() if seen["n"] == 0 else None
        result = _finish(self, p)
        seen["n"] += 1
        seen["rows"] += p.num_tokens
        seen["ms"] += result.forward_s * 1e3
        if seen["n"] == LIMIT:
            prof.stop()
        return result
    return _finish(self, p)


runner_mod.ModelRunner._finish = profiled
model = sys.argv[1] if len(sys.argv) > 1 else "bench"
sys.argv = ["cpu_runtime", "--model", model, "--variants", "bf16", "--single-requests", "1",
            "--rounds", "1", "--ttft-prompts", "0"]
kit.main(cpu_runtime.SPEC)
print(f"{seen['n']} steps, {seen['rows']} rows, forward {seen['ms']:.1f} ms in all "
      f"({seen['ms'] / seen['rows']:.3f} ms a row)")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
