"""The router's connections: one Connect stream per replica, one Detokenize stream."""
from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("llmesh.router")


class Detokenizer:
    """One bidi stream to the tokenizer; one message per engine step per replica."""

    def __init__(self, channel: grpc.aio.Channel):
        self.stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._call = None
        self._reader = None

    async def _ensure(self) -> None:
        if self._call is None or self._call.done():
            self._call = self.stub.Detokenize(wait_for_ready=True)
            self._reader = asyncio.ensure_future(self._read(self._call))

    async def _read(self, call) -> None:
        try:
            async for resp in call:
                fut = self._pending.pop(resp.batch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(list(resp.text_deltas))
        except grpc.aio.AioRpcError as e:
            log.warning("detokenize stream ended: %s", e.code().name)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("tokenizer stream lost"))
        self._pending.clear()

    async def detokenize(self, items: list[tokenizer_pb2.DetokenizeItem]) -> list[str]:
        if not items:
            return []
        async with self._lock:
            await self._ensure()
            batch_id = next(self._ids)
            fut = asyncio.get_running_loop().create_future()
            self._pending[batch_id] = fut
            await self._call.write(tokenizer_pb2.DetokenizeRequest(batch_id=batch_id, items=items))
        return await fut


class Replica:
    """One scheduler: a Connect stream carrying adds / cancels up and StepOutputs down."""

    def __init__(self, name: str, address: str, on_outputs, on_lost):
        self.name = name
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.info: scheduler_pb2.ReplicaInfo | None = None
        self.in_flight: set[str] = set()
        self.is_ready = False
        self._call = None
        self._write_lock = asyncio.Lock()  # one write at a time on a stream
        self._on_outputs = on_outputs  # async (replica, StepOutputs)
        self._on_lost = on_lost  # (replica, request_ids, reason)

    async def run(self) -> None:
        """Connect, read StepOutputs until the stream breaks, reconnect with backoff."""
        backoff = 0.1
        while True:
            try:
                self.info = await self.stub.GetInfo(scheduler_pb2.GetInfoRequest(),
                                                    wait_for_ready=True, timeout=30)
                self._call = self.stub.Connect(wait_for_ready=True)
                self.is_ready = True
                backoff = 0.1
                async for outputs in self._call:
                    await self._on_outputs(self, outputs)
                reason = "scheduler closed the stream"
            except grpc.aio.AioRpcError as e:
                reason = f"scheduler stream failed ({e.code().name})"
            except asyncio.CancelledError:
                raise
            self.is_ready = False
            lost, self.in_flight = self.in_flight, set()
            if lost:
                log.warning("replica %s lost with %d requests: %s", self.name, len(lost), reason)
                self._on_lost(self, lost, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def send(self, msg: scheduler_pb2.RouterMessage) -> None:
        async with self._write_lock:
            await self._call.write(msg)
