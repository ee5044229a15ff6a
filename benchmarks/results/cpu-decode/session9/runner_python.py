"""Probe: the runner's own Python around a one-sequence decode step of the bfloat16 bench
model (the CPU decode kernel's steps): prepare, finish (forward + sampling) and their
parts, 2,000 steps, medians; then cProfile's top functions.
Usage: python runner_python.py [bench|smollm2]"""
import cProfile
import pstats
import statistics
import sys
import time

import torch

from llmesh.mesh.default_model import resolve_model
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.weights import load_model

model = load_model(resolve_model(sys.argv[1] if len(sys.argv) > 1 else "bench"), "bfloat16")
runner = ModelRunner(model, 512, 16)
assert runner.cpu_decode is not None
params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
prompt = [1] + list(range(5, 105))
blocks = iter(range(1, 512))
table = [next(blocks) for _ in range(8)]
ids = iter(range(1, 10**6))
runner.execute(StepPlan(step_id=next(ids), new=[NewSequence(
    seq_id="s", token_ids=prompt, num_prompt_tokens=len(prompt), params=params, index=0,
    num_computed=0, block_ids=table)], scheduled=[ScheduledSequence("s", len(prompt), 8, [])]))
length = len(prompt) + 1
prep, fin, fwd, samp = [], [], [], []


def decode_step():
    global length
    new_blocks = [next(blocks)] if length % 16 == 0 else []
    kept = -(-length // 16) - len(new_blocks)
    plan = StepPlan(step_id=next(ids), scheduled=[ScheduledSequence("s", 1, kept, new_blocks)])
    t0 = time.perf_counter()
    p = runner.prepare(plan)
    t1 = time.perf_counter()
    r = runner.finish(p)
    t2 = time.perf_counter()
    prep.append(t1 - t0)
    fin.append(t2 - t1)
    fwd.append(r.forward_s)
    samp.append(r.sample_s)
    length += 1


torch.set_num_threads(2)  # (as the executor: its small steps on one thread fewer)
for _ in range(200):
    decode_step()
prep.clear(); fin.clear(); fwd.clear(); samp.clear()
for _ in range(1000):
    decode_step()
med = lambda xs: 1e3 * statistics.median(xs)
print(f"prepare {med(prep):.3f} ms, finish {med(fin):.3f} (forward {med(fwd):.3f}, "
      f"sampling {med(samp):.3f}, the rest {med(fin) - med(fwd) - med(samp):.3f}) at contexts "
      f"{len(prompt) + 200}-{length}")
pr = cProfile.Profile()
pr.enable()
for _ in range(500):
    decode_step()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
