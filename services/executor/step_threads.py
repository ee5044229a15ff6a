"""How many CPU threads torch uses for a step.

A decode step of a few sequences is a chain of small matrix-vector products:
its host work (the loop, the sampler, and on a small machine the scheduler,
router and gateway processes) runs beside it, and when torch's OpenMP team
holds every core, that work preempts a team member in the middle of a parallel
region and the whole team waits for it. On the bench box (2 cores) the bench
model's forward alone took 5.3 ms with 2 threads and 6.9 ms with 1
(benchmarks/results/cpu-decode/forward-profile.log), yet in the in-process
engine a single stream went from 9.47 to 7.63 ms a token when its small steps
ran on 1 thread (cpu-decode/engine-ab.log). So steps of at most `small_tokens` tokens
run on one thread fewer than the process has, leaving a core to the host;
larger steps (prefills, big batches), whose compute dominates, use them all.
On a GPU this changes nothing (the host threads only launch kernels).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

SMALL_STEP_TOKENS = 8


class StepThreads:
    def __init__(self, device: torch.device, small_tokens: int = SMALL_STEP_TOKENS):
        self.small_tokens = small_tokens
        self.enabled = device.type == "cpu"

    @contextmanager
    def step(self, num_tokens: int):
        """Around a step's forward: one thread fewer when it is small. torch's thread
        count is the process's, so it is put back as it was afterwards."""
        before = torch.get_num_threads()
        if not self.enabled or num_tokens > self.small_tokens or before < 2:
            yield
            return
        torch.set_num_threads(before - 1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
