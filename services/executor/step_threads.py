"""How many CPU threads torch uses for a step.

A decode step of a few sequences is a chain of small matrix-vector products:
its host work (the loop, the sampler, and on a small machine the scheduler,
router and gateway processes) runs beside it, and when torch's OpenMP team
holds every core, that work preempts a team member in the middle of a parallel
region and the whole team waits for it. On the bench box (2 cores) the bench
model's forward alone took 5.3 ms with 2 threads and 6.9 ms with 1
(benchmarks/results/cpu-decode/forward-profile.log), yet in the in-process
engine a single stream went from 9.47 to 7.63 ms a token when its small steps
ran on 1 thread (cpu-decode/engine-ab.log). So small steps run on one thread
fewer than the process has, leaving a core to the host; larger steps
(prefills, big batches), whose compute dominates, use them all. A step is small
when it has at most `small_tokens` tokens, or when its matrix work (about 2
FLOPs per weight per token) is under `small_flops`: on a small model a step of
hundreds of tokens is still cheaper than the OpenMP team's fork and join
around each of its ops (the tiny model offline: 8.1-9.1k tokens/s with every
step over 8 tokens on 2 threads, 11.7-13.7k on 1; the bench model: 728-776 with
its 9-64-token steps on 2 threads, 629-653 on 1; host-loop/step-threads.log).
On a GPU this changes nothing (the host threads only launch kernels).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

SMALL_STEP_TOKENS = 8
SMALL_STEP_FLOPS = 5e8


class StepThreads:
    def __init__(self, device: torch.device, flops_per_token: float = 0.0,
                 small_tokens: int = SMALL_STEP_TOKENS, small_flops: float = SMALL_STEP_FLOPS):
        """`flops_per_token`: the model's matrix work per token (0: steps are small by
        their token count alone)."""
        self.small_tokens = small_tokens
        # the largest step that is small by its work
        self.small_by_work = int(small_flops // flops_per_token) if flops_per_token else 0
        self.enabled = device.type == "cpu"

    def is_small(self, num_tokens: int) -> bool:
        return num_tokens <= max(self.small_tokens, self.small_by_work)

    @contextmanager
    def step(self, num_tokens: int):
        """Around a step's forward: one thread fewer when it is small. torch's thread
        count is the process's, so it is put back as it was afterwards."""
        before = torch.get_num_threads()
        if not self.enabled or not self.is_small(num_tokens) or before < 2:
            yield
            return
        torch.set_num_threads(before - 1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
