"""Leak watchdog: memory that a replica holds and should not.

Two signs, each past a threshold, mean a leak:
- KV blocks still allocated after the replica has had nothing queued or running
  for `idle_s` (the scheduler's bookkeeping lost them: only a restart of the
  scheduler gives them back);
- a process's resident memory grown past `rss_growth` over its baseline (and by
  at least `rss_floor_mb`), the baseline being its RSS at the first check after
  `warmup_s` (caches, allocator pools and the KV have settled by then).

A leak is answered by a drain (no new requests, running ones finish) and a
graceful restart of the process that leaks: the scheduler for KV and its own
RSS, the executor group for theirs. This module only decides; the scheduler's
main wires the drain and the restart, the log line and the metric.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULER = "scheduler"
EXECUTORS = "executors"


@dataclass(frozen=True)
class LeakLimits:
    check_interval_s: float = 10.0  # 0 = no watchdog
    idle_s: float = 30.0  # KV blocks allocated this long with no request: leaked
    max_idle_blocks: int = 0
    rss_growth: float = 0.5  # RSS over (1 + growth) x baseline ...
    rss_floor_mb: float = 256.0  # ... and over baseline + this
    warmup_s: float = 60.0  # the RSS baseline is taken after this


@dataclass(frozen=True)
class Leak:
    kind: str  # "kv" or "rss" (the metric's label)
    restart: str  # SCHEDULER or EXECUTORS: which process restarts
    reason: str  # the log line's words


class LeakWatchdog:
    def __init__(self, limits: LeakLimits, now: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._now = now
        self._started_s = now()
        self._idle_leak_since: float | None = None
        self._baselines: dict[str, int] = {}

    def forget(self, process: str) -> None:
        """`process` restarted: its next RSS sample is a new baseline."""
        self._baselines.pop(process, None)

    def check(self, is_idle: bool, num_used_blocks: int,
              rss_bytes: dict[str, int]) -> Leak | None:
        """One look. `rss_bytes`: each process's RSS now ("scheduler", or an executor
        rank's name), 0 where unknown."""
        now = self._now()
        lim = self.limits
        if is_idle and num_used_blocks > lim.max_idle_blocks:
            if self._idle_leak_since is None:
                self._idle_leak_since = now
            held_s = now - self._idle_leak_since
            if held_s >= lim.idle_s:
                return Leak("kv", SCHEDULER, f"{num_used_blocks} KV blocks stay allocated with "
                            f"no request queued or running ({held_s:.0f}s)")
        else:
            self._idle_leak_since = None
        if now - self._started_s < lim.warmup_s:
            return None
        for process, rss in rss_bytes.items():
            if not rss:
                continue
            base = self._baselines.setdefault(process, rss)
            limit = max(base * (1 + lim.rss_growth), base + lim.rss_floor_mb * 2**20)
            if rss > limit:
                return Leak("rss", SCHEDULER if process == SCHEDULER else EXECUTORS,
                            f"{process} RSS {_mib(rss)} MiB is past its limit of {_mib(limit)} "
                            f"MiB (baseline {_mib(base)} MiB)")
        return None


def _mib(num_bytes: float) -> int:
    return round(num_bytes / 2**20)
