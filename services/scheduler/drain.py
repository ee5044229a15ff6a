"""Draining a replica, and the leak watchdog's restarts.

A drain refuses new requests (routers send them elsewhere) and waits, within a
bound, for the running ones to finish. It comes before every graceful stop of a
scheduler (SIGTERM, a scale-in, a leak) and before the executor group restarts.
"""
from __future__ import annotations

import asyncio
import logging
import time

from llmesh.observability.metrics import leak_restarts
from llmesh.services.common.rss import current_rss_bytes
from llmesh.services.scheduler.executor_client import ExecutorGroup
from llmesh.services.scheduler.leak_watchdog import SCHEDULER, LeakWatchdog
from llmesh.services.scheduler.loop import EngineLoop
from llmesh.services.scheduler.replica_state import State

log = logging.getLogger("llmesh.scheduler")


async def drain(loop: EngineLoop, timeout_s: float, restart: bool = False) -> bool:
    """No new requests from now (until the executors are back, with `restart`;
    for good otherwise); True once nothing runs, False if `timeout_s` passed first
    (what still runs is then lost to the restart, and routers move it)."""
    if restart:
        await loop.state.restart("draining for an executor restart")
    else:
        await loop.state.drain("draining to stop")
    until = time.monotonic() + timeout_s
    while not loop.is_idle and time.monotonic() < until:
        await asyncio.sleep(0.05)
    if not loop.is_idle:
        log.warning("drain: %d requests still running after %.0fs", len(loop.tracks), timeout_s)
    return loop.is_idle


class LeakGuard:
    """Looks for leaks every `check_interval_s`; answers one with a drain and a
    restart: of this scheduler (`stop_service`, which drains first), or of the
    executor group (drained here; the scheduler reconnects when it is back)."""

    def __init__(self, watchdog: LeakWatchdog, loop: EngineLoop, executors: ExecutorGroup,
                 stop_service, drain_timeout_s: float,
                 test_leak_kv_blocks: int = 0):
        self.watchdog = watchdog
        self.loop = loop
        self.executors = executors
        self.stop_service = stop_service
        self.drain_timeout_s = drain_timeout_s
        self.test_leak_kv_blocks = test_leak_kv_blocks  # tests only: blocks to lose ...
        self._is_test_leak_due = False  # ... when idle, once told (test_leak_kv)
        self._epochs: tuple[int, ...] = ()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog.limits.check_interval_s)
            leak = self.check()
            if leak is None:
                continue
            log.error("leak watchdog: %s; draining, then restarting the %s", leak.reason,
                      leak.restart)
            leak_restarts().labels(leak.kind, leak.restart).inc()
            if leak.restart == SCHEDULER:
                self.stop_service()  # (the stop drains first)
                return
            await restart_executors(self.loop, self.executors, self.drain_timeout_s)

    def check(self):
        if self.executors.kv_epochs != self._epochs:  # new ranks: new baselines
            self._epochs = self.executors.kv_epochs
            for rank in range(len(self.executors.addresses)):
                self.watchdog.forget(f"executor-rank{rank}")
        if self._is_test_leak_due and self.loop.is_idle:
            self.loop.kv.pool.allocate(self.test_leak_kv_blocks)  # held by nobody
            self._is_test_leak_due = False
        rss = {SCHEDULER: current_rss_bytes(), **self.executors.rss_bytes}
        return self.watchdog.check(self.loop.is_idle, self.loop.kv.pool.num_used, rss)

    def test_leak_kv(self) -> None:
        """Tests only: lose `test_leak_kv_blocks` at the next check that finds the
        replica idle (a bookkeeping bug's effect)."""
        self._is_test_leak_due = True


async def restart_executors(loop: EngineLoop, executors: ExecutorGroup,
                            drain_timeout_s: float) -> None:
    """Drain, then ask the ranks to restart; returns once they are back (the
    engine's driver reports them up: the replica takes requests again), or after
    180 s."""
    await drain(loop, drain_timeout_s, restart=True)
    await executors.request_exit()
    if not await loop.state.wait_for(State.SERVING, State.EJECTED, State.DRAINING,
                                     State.STOPPED, timeout_s=180):
        log.error("the executor group is not back 180s after its restart")
