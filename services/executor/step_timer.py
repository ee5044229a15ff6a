"""What a step's forward and sampling took (the runner's timings)."""
from __future__ import annotations

import time

import torch


class StepTimer:
    """What a step's forward and sampling took. On a GPU, from CUDA events (the
    device's own time: launching returns long before the work is done), read
    after the step's one synchronising copy; on the CPU, the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def start(self) -> None:
        """The forward begins (after the step was prepared)."""
        if self.cuda:
            self._events[0].record()
        self._t = [time.perf_counter()]

    def mark(self) -> None:
        if self.cuda:
            self._events[1].record()
        self._t.append(time.perf_counter())

    def finish(self) -> tuple[float, float]:
        """(forward_s, sample_s)"""
        self._t.append(time.perf_counter())
        if not self.cuda:
            return self._t[1] - self._t[0], self._t[2] - self._t[1]
        start, mid, end = self._events
        end.record()
        end.synchronize()  # (the sampled tokens' copy already waited for the step)
        return start.elapsed_time(mid) / 1000, mid.elapsed_time(end) / 1000
