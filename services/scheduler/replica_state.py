"""One replica's lifecycle, owned by one object: its state, and the events that
move it. Whatever asks "may this replica take a request?", "is it SERVING?",
"may it be probed?" reads it here; whatever changes it (the executor driver,
the known-answer probe, a drain, an executor restart, the stop) sends an
event. The gRPC health status follows it through `on_change`, never polled.

    STARTING --executors_up--> SERVING <--probe_passed / probe_failed--> EJECTED
        ^                        |                                        |
        +-----executors_down-----+----------------------------------------+
    STARTING | SERVING | EJECTED --restart--> RESTARTING --executors_up--> SERVING
                                                         (EJECTED if the probe's
                                                          last verdict was a fail)
    any but STOPPED --drain--> DRAINING --stopped--> STOPPED

STARTING, SERVING and EJECTED take requests into the queue (they wait for the
executors, within their deadlines; routers send none to a replica that is not
SERVING). RESTARTING, DRAINING and STOPPED refuse them (routers move them).
The probe's verdict outlives the executors: a replica ejected by it comes back
from an executor failure or restart EJECTED, until a probe passes.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("llmesh.scheduler")


class State(enum.Enum):
    STARTING = "starting"  # the executor group is not (yet, or again) up
    SERVING = "serving"
    EJECTED = "ejected"  # the known-answer probe failed: its answers are not trusted
    RESTARTING = "restarting"  # no new requests: the executors restart, then it serves
    DRAINING = "draining"  # no new requests: the replica stops
    STOPPED = "stopped"


_REFUSING = (State.RESTARTING, State.DRAINING, State.STOPPED)


class ReplicaState:
    def __init__(self, state: State = State.STARTING,
                 on_change: Callable[[State], Awaitable[None] | None] | None = None):
        """`on_change(new_state)` is called (and awaited, if it returns an awaitable)
        after every transition."""
        self._state = state
        self._on_change = on_change
        self._changed = asyncio.Condition()
        self._probe_failed = False  # the known-answer probe's last verdict
        self.history: list[tuple[State, str]] = [(state, "start")]

    @property
    def state(self) -> State:
        return self._state

    @property
    def takes_requests(self) -> bool:
        return self._state not in _REFUSING

    @property
    def is_serving(self) -> bool:
        return self._state is State.SERVING

    @property
    def is_draining(self) -> bool:
        """New requests go elsewhere (what the load report tells routers)."""
        return self._state in _REFUSING

    @property
    def is_ejected(self) -> bool:
        return self._probe_failed

    @property
    def can_probe(self) -> bool:
        """The executors are up and nothing drains: a probe's answer means something."""
        return self._state in (State.SERVING, State.EJECTED)

    # ---- events ------------------------------------------------------------------
    async def executors_up(self) -> None:
        """The executor group answers: at start, after a failure, or back from a
        restart (the replica takes requests again)."""
        if self._state in (State.STARTING, State.RESTARTING):
            await self._to(State.EJECTED if self._probe_failed else State.SERVING,
                           "executors up")

    async def executors_down(self) -> None:
        """The group failed or went away (a restart or a drain keeps refusing)."""
        if self._state in (State.SERVING, State.EJECTED):
            await self._to(State.STARTING, "executors down")

    async def probe_failed(self) -> None:
        self._probe_failed = True
        if self._state is State.SERVING:
            await self._to(State.EJECTED, "known-answer probe failed")

    async def probe_passed(self) -> None:
        self._probe_failed = False
        if self._state is State.EJECTED:
            await self._to(State.SERVING, "known-answer probe passed")

    async def restart(self, why: str) -> None:
        """Refuse new requests while the executors restart (`executors_up` ends it)."""
        if self._state in (State.STARTING, State.SERVING, State.EJECTED):
            await self._to(State.RESTARTING, why)

    async def drain(self, why: str) -> None:
        """Refuse new requests from now on: the replica stops."""
        if self._state is not State.STOPPED:
            await self._to(State.DRAINING, why)

    async def stopped(self) -> None:
        await self._to(State.STOPPED, "stopped")

    async def wait_for(self, *states: State, timeout_s: float) -> bool:
        """True once the state is one of `states`; False after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: self._state in states)
            return True
        except TimeoutError:
            return False

    async def _to(self, state: State, why: str) -> None:
        if state is self._state:
            return
        log.info("replica: %s -> %s (%s)", self._state.value, state.value, why)
        self._state = state
        self.history.append((state, why))
        if self._on_change is not None:
            result = self._on_change(state)
            if asyncio.iscoroutine(result):
                await result
        async with self._changed:
            self._changed.notify_all()
