"""The router's side of its replicas: which one serves a request, its deltas on
the way back, and moving it to another replica when the one serving it is lost.

A request that loses its replica (the scheduler died, or the stream to it
broke) is resubmitted, to whichever replica is ready first (the same one once
it is back), as its prompt plus the output tokens the client already has; the
replica continues after them, so the client sees a pause and then the tokens a
fault-free run gives (sampling is keyed by seed and position, and the router
fixed the seed). An n > 1 request moves as its unfinished choices, each after its
own tokens. At most `max_migrations` times.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from llmesh.v1 import scheduler_pb2
from llmesh.observability.metrics import router_metrics
from llmesh.services.router.breaker import BROKEN, CircuitBreaker, State as BreakerState
from llmesh.services.router.core import ReplicaChooser, ReplicaLoad, standby_active
from llmesh.services.router.replica_set import ReplicaEntry
from llmesh.services.router.replicas import Replica

log = logging.getLogger("llmesh.router")
# a replica's word that it refuses a class holds this long (its idle report comes
# every 100 ms; a busy one reports with every step)
REFUSAL_FRESH_S = 0.15


class Inbox:
    """A request's deltas as they arrive from its replica (or a loss reason, a
    str); the stream takes all that wait at once, so a stream that fell behind
    catches up in fewer messages."""

    def __init__(self):
        self._items: list = []
        self._ready = asyncio.Event()

    def put(self, item) -> None:
        self._items.append(item)
        self._ready.set()

    async def take(self) -> list:
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items


def coalesce(pending: deque):
    """The next response's delta: consecutive plain deltas of one sequence that
    wait together are joined (tokens, text, logprobs; the last one's finish
    reason, usage and timings)."""
    delta = pending.popleft()
    merged = None
    while pending and not (isinstance(delta, str) or delta.error or delta.finish_reason):
        nxt = pending[0]
        if isinstance(nxt, str) or nxt.error or nxt.index != delta.index:
            break
        pending.popleft()
        if merged is None:
            merged = scheduler_pb2.SeqDelta()
            merged.CopyFrom(delta)
        merged.new_token_ids.extend(nxt.new_token_ids)
        merged.logprobs.extend(nxt.logprobs)
        merged.text += nxt.text
        if nxt.finish_reason:
            merged.finish_reason = nxt.finish_reason
            merged.usage.CopyFrom(nxt.usage)
            merged.timings.CopyFrom(nxt.timings)
            break
    return merged if merged is not None else delta


def resumed(add: scheduler_pb2.AddRequest, streamed: dict[int, list[int]]
            ) -> scheduler_pb2.AddRequest | None:
    """`add` as it continues elsewhere: n = 1 after its tokens so far; n > 1 as its
    unfinished choices, each after its own tokens (or whole again when none has any:
    it had not forked). None when a choice is unfinished with no tokens while others
    have some (a fork the router saw only part of: never expected)."""
    out = scheduler_pb2.AddRequest()
    out.CopyFrom(add)
    out.arrival_unix_s = 0.0  # (a moved request is not held to the TTFT budget again)
    if add.sampling.n == 1:
        out.resume_token_ids[:] = streamed.get(0, [])
    elif any(streamed.values()):
        if not all(streamed.values()):
            return None
        del out.resume_choices[:]
        for index, tokens in sorted(streamed.items()):
            out.resume_choices.add(index=index, token_ids=tokens)
    return out


@dataclass
class Route:
    """Where one request runs now."""

    request_id: str
    add: scheduler_pb2.AddRequest
    replica: Replica | None = None
    num_migrations: int = 0


class Dispatcher:
    def __init__(self, scheduler_addresses: list[str], max_migrations: int = 3,
                 replica_wait_s: float = 30.0, num_standby: int = 0,
                 chooser: ReplicaChooser | None = None, prefix_index=None,
                 replica_silence_s: float = 5.0):
        """`scheduler_addresses`: the replicas at start (replica-0, ...; the last
        `num_standby` of them warm standbys), until `set_replicas` says otherwise.
        `chooser` decides among the replicas that take a request; with
        `prefix_index` (services/router/clients.py, and a kv_aware chooser) it knows
        what each holds of the prompt. A replica silent for `replica_silence_s` is
        lost (services/router/replicas.py)."""
        self.replica_silence_s = replica_silence_s
        self.chooser = chooser or ReplicaChooser()
        self._prefix_index = prefix_index if self.chooser.policy.policy == "kv_aware" else None
        self.replicas: list[Replica] = []
        # warm, probed, used only while another is not ready
        self.standby: set[str] = set()
        self._standby_was_active = False
        self.max_migrations = max_migrations
        self.replica_wait_s = replica_wait_s
        self._inboxes: dict[str, Inbox] = {}
        # per replica (the object: a name can move to another address and come back)
        self._tasks: dict[Replica, list[asyncio.Task]] = {}
        self._started = False
        n = len(scheduler_addresses)
        self.set_replicas([ReplicaEntry(f"replica-{i}", a, standby=i >= n - num_standby)
                           for i, a in enumerate(scheduler_addresses)])

    def start(self) -> None:
        self._started = True
        for r in self.replicas:
            self._run(r)

    def _run(self, replica: Replica) -> None:
        self._tasks[replica] = [asyncio.ensure_future(t)
                                     for t in (replica.run(), replica.watch_health())]

    def set_replicas(self, entries: list[ReplicaEntry]) -> None:
        """The replicas as they are now: new ones join (their scheduler is SERVING:
        requests go to them once their stream is up), draining ones take no new
        requests, and ones no longer listed take none and leave once nothing of
        theirs is in flight."""
        known = {r.name: r for r in self.replicas}
        listed = {e.name for e in entries}
        for e in entries:
            replica = known.get(e.name)
            if replica is None or replica.address != e.address:
                if replica is not None:  # (the same name elsewhere: a new replica)
                    self._retire(replica)
                replica = Replica(e.name, e.address, self._on_outputs, self._on_lost,
                                  CircuitBreaker(), self._on_unready, self.replica_silence_s)
                self.replicas.append(replica)
                log.info("replica %s (%s) joins%s", e.name, e.address,
                         " as a warm standby" if e.standby else "")
                if self._started:
                    self._run(replica)
            if replica.retiring != e.draining:
                replica.retiring = e.draining
                log.info("replica %s %s", e.name, "drains: no new requests" if e.draining
                         else "takes requests again")
        for replica in self.replicas:
            if replica.name not in listed:
                self._retire(replica)
        self.standby = {e.name for e in entries if e.standby}
        self.reap()

    def _retire(self, replica: Replica) -> None:
        if not replica.retired:
            log.info("replica %s leaves (%d requests still in flight)", replica.name,
                     len(replica.in_flight))
        replica.retiring = replica.retired = True

    def reap(self) -> None:
        """Drop the replicas that left and have nothing in flight."""
        for replica in [r for r in self.replicas if r.retired and not r.in_flight]:
            self.replicas.remove(replica)
            for task in self._tasks.pop(replica, ()):
                task.cancel()
            if self._started:
                asyncio.ensure_future(replica.channel.close())

    @property
    def is_ready(self) -> bool:
        return any(r.is_ready for r in self.replicas)

    def refusing(self, cls: str):
        """When every replica that takes requests said in a recent load report (at
        most `REFUSAL_FRESH_S` old: a busy replica reports with every step) that it
        would refuse a request of `cls` now: the refusal with the shortest retry hint
        among them; else None (one might take it, or none takes requests at all)."""
        refusals = []
        fresh = time.monotonic() - REFUSAL_FRESH_S
        for r in self.replicas:
            if r.takes_requests() and (r.name not in self.standby or self._standby_was_active):
                if r.load is None or r.load_at < fresh or cls not in r.load.refusing:
                    return None
                refusals.append(r.load.refusing[cls])
        return min(refusals, key=lambda x: x.retry_after_s) if refusals else None

    def pick(self, cached: dict[str, int] | None = None) -> Replica | None:
        """The replica for a new request (None: none takes one); `cached`: prompt
        tokens each replica holds (the kvcache index's answer)."""
        cached = cached or {}
        if any(r.retired for r in self.replicas):
            self.reap()
        loads = [ReplicaLoad(r.name, r.takes_requests(), len(r.in_flight), r.name in self.standby,
                             queued=max(r.load.num_running + r.load.num_waiting,
                                        len(r.in_flight)) if r.load is not None else None,
                             kv_usage=r.load.kv_usage if r.load is not None else 0.0,
                             cached_tokens=cached.get(r.name, 0))
                 for r in self.replicas]
        if self.standby:
            active = standby_active(loads)
            if active != self._standby_was_active:
                self._standby_was_active = active
                log.warning("warm standby %s: %s", ",".join(sorted(self.standby)),
                            "taking requests (a replica is not ready)" if active else
                            "idle again (every replica is ready)")
                router_metrics().standby_active.set(1 if active else 0)
        name = self.chooser.pick(loads)
        return next((r for r in self.replicas if r.name == name), None)

    async def choose(self, prompt: list[int], salt: str, deadline_s: float = 0.0
                     ) -> Replica | None:
        """`pick` with what the kvcache index knows of `prompt` (asked only when
        there is a choice; a slow or absent index costs at most 50 ms, then the
        choice goes by load alone), waiting like `wait_ready` when no replica
        takes requests."""
        cached = {}
        if self._prefix_index is not None \
                and sum(r.takes_requests() for r in self.replicas) > 1:
            cached = await self._prefix_index.match(prompt, salt)
        replica = self.pick(cached)
        return replica if replica is not None else await self.wait_ready(deadline_s)

    async def wait_ready(self, deadline_s: float = 0.0, any_one: bool = False
                         ) -> Replica | None:
        """A ready replica, waiting at most `replica_wait_s` (and never past the unix
        `deadline_s`) while replicas recover: the policy's pick, or with `any_one`
        the first that takes requests (for what every replica shares: model limits)."""
        until = time.monotonic() + self.replica_wait_s
        if deadline_s:
            until = min(until, time.monotonic() + deadline_s - time.time())
        find = (lambda: next((r for r in self.replicas if r.takes_requests()), None)) \
            if any_one else self.pick
        while (replica := find()) is None and time.monotonic() < until:
            await asyncio.sleep(0.05)
        return replica

    def has(self, request_id: str) -> bool:
        return request_id in self._inboxes

    def open(self, request_id: str) -> Inbox:
        inbox = self._inboxes[request_id] = Inbox()
        return inbox

    def close(self, route: Route) -> None:
        self._inboxes.pop(route.request_id, None)
        if route.replica is not None:
            route.replica.in_flight.discard(route.request_id)
            if route.replica.retired:
                self.reap()

    async def submit(self, route: Route, replica: Replica,
                     add: scheduler_pb2.AddRequest | None = None) -> None:
        """Send the request to `replica`; a stream that is already broken counts as
        the replica's loss (the request's inbox hears of it)."""
        route.replica = replica
        replica.in_flight.add(route.request_id)
        replica.breaker.on_sent()
        if not await replica.send(scheduler_pb2.RouterMessage(add=add or route.add)):
            replica.in_flight.discard(route.request_id)
            self._lost(route.request_id, f"{replica.name}: stream to the scheduler broke")

    async def migrate(self, route: Route, streamed: dict[int, list[int]], reason: str,
                      refused: bool = False) -> bool:
        """Resubmit after `reason` took its replica: the prompt, and per unfinished
        choice (the keys of `streamed`) the output tokens its client has. False when
        it may not move (too many moves, no replica). `refused`: the replica turned
        the request away unstarted because it drains (not a failure: the breaker
        does not hear of it, no move is counted)."""
        if refused:
            route.replica.mark_draining()
        else:
            self.record(route, BROKEN)
            if route.num_migrations >= self.max_migrations:
                return False
            route.num_migrations += 1
        add = resumed(route.add, streamed)
        if add is None:
            return False
        old = route.replica
        old.in_flight.discard(route.request_id)  # (its later deltas are dropped)
        if old.is_connected:  # alive but not serving: free the request there
            await old.send(scheduler_pb2.RouterMessage(
                cancel=scheduler_pb2.CancelRequest(request_id=route.request_id)))
        replica = await self.wait_ready(route.add.deadline_unix_s)
        if replica is None:
            return False
        log.info("request %s moves to %s after %d tokens (%s)", route.request_id, replica.name,
                 sum(map(len, streamed.values())), reason)
        router_metrics().migrations.inc()
        await self.submit(route, replica, add)
        return True

    def record(self, route: Route, outcome: str) -> None:
        """What the request's replica did with it, for the replica's circuit breaker."""
        replica = route.replica
        if replica is None:
            return
        breaker = replica.breaker
        opened, was_closed = breaker.num_opened, breaker.state is BreakerState.CLOSED
        breaker.record(outcome)
        metrics = router_metrics()
        if breaker.num_opened > opened:
            metrics.breaker_opened.labels(replica.name).inc()
            metrics.breaker_open.labels(replica.name).set(1)
            log.warning("replica %s: circuit breaker open (error rate %.1f%%): no new requests "
                        "until a trial succeeds", replica.name, 100 * breaker.error_rate)
        elif not was_closed and breaker.state is BreakerState.CLOSED:
            metrics.breaker_open.labels(replica.name).set(0)
            log.warning("replica %s: circuit breaker closed (its trial request succeeded)",
                        replica.name)

    async def cancel(self, route: Route) -> None:
        """The client went away: free the request upstream now."""
        replica = route.replica
        if replica is not None and route.request_id in replica.in_flight and replica.is_connected:
            await replica.send(scheduler_pb2.RouterMessage(
                cancel=scheduler_pb2.CancelRequest(request_id=route.request_id)))

    # ---- from the replicas' streams -------------------------------------
    def _on_outputs(self, replica: Replica, outputs: scheduler_pb2.StepOutputs) -> None:
        """One step's deltas of one replica, to their requests' inboxes (never waits),
        and the replica's load as its scheduler reports it."""
        if outputs.HasField("load"):
            replica.load, replica.load_at = outputs.load, time.monotonic()
        stamp = outputs.emitted_unix_s
        for d in outputs.deltas:
            d.emitted_unix_s = stamp
            inbox = self._inboxes.get(d.request_id)
            if inbox is not None and d.request_id in replica.in_flight:  # (not a stale one)
                inbox.put(d)

    def _on_unready(self, replica: Replica) -> None:
        """A replica turned NOT_SERVING (its executors down or hung, or a failed probe)
        with its stream up: its requests move to a replica that serves, if one does
        (else they wait there, and resume when its executors are back)."""
        if not replica.in_flight or not any(r.takes_requests() for r in self.replicas
                                            if r is not replica):
            return
        log.warning("replica %s is not serving: moving its %d requests", replica.name,
                    len(replica.in_flight))
        moving, replica.in_flight = replica.in_flight, set()  # (its later deltas are dropped)
        for request_id in moving:
            self._lost(request_id, f"{replica.name}: not serving (executors down or hung)")

    def _on_lost(self, replica: Replica, request_ids: set[str], reason: str) -> None:
        for request_id in request_ids:
            self._lost(request_id, f"{replica.name}: {reason}")

    def _lost(self, request_id: str, reason: str) -> None:
        inbox = self._inboxes.get(request_id)
        if inbox is not None:
            inbox.put(reason)
