"""One sequence's decode steps through the ModelRunner alone (no mesh, no loop): ms a step,
and what of it is not the kernel's forward. Usage: runner_single.py bench|smollm2 DTYPE [profile]"""
import cProfile
import pstats
import sys
import time

import numpy as np
import torch

from llmesh.mesh.default_model import resolve_model
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.weights import load_model

name, dtype = sys.argv[1], sys.argv[2]
model = load_model(resolve_model(name), dtype)
runner = ModelRunner(model, 128, 16)
params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
prompt = [1] + list(range(10, 137))
runner.execute(StepPlan(step_id=1, new=[NewSequence(
    seq_id="s", token_ids=prompt, num_prompt_tokens=len(prompt), params=params, index=0,
    num_computed=0, block_ids=list(range(64)))], scheduled=[ScheduledSequence("s", len(prompt), 64, [])]))
kernel_ms = []
run = runner.cpu_decode.run


def timed(*a):
    t = time.perf_counter()
    out = run(*a)
    kernel_ms.append((time.perf_counter() - t) * 1e3)
    return out


runner.cpu_decode.run = timed
step_ms = []


def steps(first, n):
    for k in range(first, first + n):
        t = time.perf_counter()
        runner.execute(StepPlan(step_id=k, scheduled=[ScheduledSequence("s", 1, 64, [])]))
        step_ms.append((time.perf_counter() - t) * 1e3)


steps(2, 50)
kernel_ms.clear(), step_ms.clear()
steps(52, 400)
print(f"{name} {dtype}: step {np.median(step_ms):.3f} ms, kernel forward {np.median(kernel_ms):.3f} ms, "
      f"the rest {np.median(np.array(step_ms) - np.array(kernel_ms)):.3f} ms (medians of 400)")
if len(sys.argv) > 3:
    prof = cProfile.Profile()
    prof.enable()
    steps(452, 400)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
