"""The router's connection to each replica: one Connect stream."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from llmesh.services.router.breaker import CircuitBreaker

log = logging.getLogger("llmesh.router")


class Replica:
    """One scheduler: a Connect stream carrying adds / cancels up and StepOutputs down,
    and a health watch. It is *ready* for new requests only while both the stream is
    up and the scheduler says SERVING (its executors answer)."""

    def __init__(self, name: str, address: str, on_outputs, on_lost, breaker: CircuitBreaker,
                 on_unready=None, silence_s: float = 5.0):
        """`silence_s`: a connected scheduler reports its load ten times a second; one
        silent this long is hung (stopped, or cut off) and counts as lost: its
        requests move, and the stream is made again."""
        self.name = name
        self.silence_s = silence_s
        self.breaker = breaker
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.info: scheduler_pb2.ReplicaInfo | None = None
        self.in_flight: set[str] = set()
        self.load: scheduler_pb2.ReplicaLoad | None = None  # the scheduler's last report ...
        self.load_at = 0.0  # ... when it came (monotonic)
        self.is_connected = False  # the Connect stream is up
        self.is_serving = False  # the scheduler's own health
        # it refused a request as draining (about to restart): no new ones until it
        # reconnects, its health changes, or a while has passed
        self.draining_until = 0.0
        # the replica set says it drains (retiring) or has left it (retired): no new
        # requests; a retired one is dropped once nothing of it is in flight
        self.retiring = False
        self.retired = False
        self._call = None
        self._write_lock = asyncio.Lock()  # one write at a time on a stream
        self._on_outputs = on_outputs  # (replica, StepOutputs), never blocks
        self._on_lost = on_lost  # (replica, request_ids, reason)
        self._on_unready = on_unready  # (replica): it turned NOT_SERVING with its stream up

    @property
    def is_ready(self) -> bool:
        return self.is_connected and self.is_serving

    def takes_requests(self) -> bool:
        """Ready, and its circuit breaker lets a new request through."""
        return self.is_ready and not self.is_draining and not self.retiring \
            and self.breaker.allows()

    @property
    def is_draining(self) -> bool:
        """It refused a request as draining a moment ago, or its load report says so."""
        return time.monotonic() < self.draining_until or bool(self.load and self.load.is_draining)

    def mark_draining(self, for_s: float = 2.0) -> None:
        self.draining_until = time.monotonic() + for_s

    async def watch_health(self) -> None:
        """Follow the scheduler's health (NOT_SERVING while its executors are down or
        hung), so the router routes by it and not by the stream alone."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        while True:
            try:
                async for resp in stub.Watch(health_pb2.HealthCheckRequest(),
                                             wait_for_ready=True):
                    was = self.is_serving
                    self.is_serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                    if self.is_serving != was:
                        self.draining_until = 0.0
                    if was and not self.is_serving and self._on_unready is not None:
                        self._on_unready(self)
            except grpc.aio.AioRpcError:
                pass
            self.is_serving = False
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        """Connect, read StepOutputs until the stream breaks, reconnect with backoff."""
        backoff = 0.1
        while True:
            try:
                self.info = await self.stub.GetInfo(scheduler_pb2.GetInfoRequest(),
                                                    wait_for_ready=True, timeout=30)
                self._call = self.stub.Connect(wait_for_ready=True)
                self.is_connected = True
                self.draining_until = 0.0
                self.breaker.reset()  # a new scheduler (or stream): judged afresh
                backoff = 0.1
                reason = await self._read(self._call)
            except grpc.aio.AioRpcError as e:
                reason = f"scheduler stream failed ({e.code().name})"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the reader die while the replica looks ready
                log.exception("replica %s: stream reader failed", self.name)
                reason = f"scheduler stream failed ({e!r})"
            if self._call is not None:
                self._call.cancel()
            self.is_connected = False
            self.load = None
            lost, self.in_flight = self.in_flight, set()
            if lost:
                log.warning("replica %s lost with %d requests: %s", self.name, len(lost), reason)
                self._on_lost(self, lost, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _read(self, call) -> str:
        """Hand on the stream's StepOutputs until it ends or goes silent; why it stopped."""
        messages = call.__aiter__()
        while True:
            try:
                outputs = await asyncio.wait_for(messages.__anext__(), self.silence_s)
            except StopAsyncIteration:
                return "scheduler closed the stream"
            except asyncio.TimeoutError:
                return f"scheduler silent for {self.silence_s:g} s (hung or cut off)"
            self._on_outputs(self, outputs)

    async def send(self, msg: scheduler_pb2.RouterMessage) -> bool:
        """False when the stream is gone (the reader reports the loss)."""
        async with self._write_lock:
            if self._call is None or self._call.done() or not self.is_connected:
                return False
            try:
                await self._call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                log.warning("replica %s: write failed (%r)", self.name, e)
                return False
        return True
