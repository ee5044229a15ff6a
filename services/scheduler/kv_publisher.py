"""Sends the block pool's events to the kvcache index, beside the step loop.

The loop only calls `notify()` after it changed the pool; this task drains the
event log and writes batches on a Publish stream, at most one every
`batch_interval_s` (a busy replica changes its pool every step: one batch per
step would cost its loop a wake-up and a message each time, for an index that
routers only consult). Every connection starts with
a snapshot, and the index asks for another when it sees a gap, so a restart of
either side (or a lost batch) resynchronises it; a kvcache that is down costs
the scheduler nothing but a reconnect now and then.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from llmesh.v1 import kvcache_pb2, kvcache_pb2_grpc
from llmesh.services.common import convert
from llmesh.services.scheduler.kv_events import KVEventLog
from llmesh.services.scheduler.kv_manager import KVCacheManager

log = logging.getLogger("llmesh.scheduler")


class KVPublisher:
    def __init__(self, address: str, replica: str, events: KVEventLog, kv: KVCacheManager,
                 batch_interval_s: float = 0.02):
        self.replica = replica
        self.batch_interval_s = batch_interval_s
        self.events = events
        self.kv = kv
        self.stub = kvcache_pb2_grpc.KVCacheStub(grpc.aio.insecure_channel(address))
        self._wake = asyncio.Event()
        self.num_snapshots = 0
        self.num_batches = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
            except grpc.aio.AioRpcError as e:
                log.info("kvcache publish stream ended (%s); reconnecting", e.code().name)
            except asyncio.InvalidStateError:  # the stream closed under a write
                pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        call = self.stub.Publish(wait_for_ready=True)
        resync = asyncio.Event()
        resync.set()  # every connection starts with a snapshot
        reader = asyncio.ensure_future(self._read(call, resync))
        try:
            while not reader.done():
                if resync.is_set() or self.events.needs_snapshot:
                    resync.clear()
                    snap = self.events.snapshot(self.kv.pool)
                    await call.write(kvcache_pb2.PublishRequest(
                        replica=self.replica, snapshot=convert.snapshot_to_proto(snap)))
                    self.num_snapshots += 1
                batch = self.events.drain()
                if batch is not None:
                    await call.write(kvcache_pb2.PublishRequest(
                        replica=self.replica, batch=convert.batch_to_proto(batch)))
                    self.num_batches += 1
                    await asyncio.sleep(self.batch_interval_s)  # (what comes meanwhile: one batch)
                    continue
                self._wake.clear()
                waits = {asyncio.ensure_future(self._wake.wait()),
                         asyncio.ensure_future(resync.wait())}
                await asyncio.wait(waits | {reader}, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
            reader.result()  # re-raise what ended the stream
        finally:
            reader.cancel()
            call.cancel()

    @staticmethod
    async def _read(call, resync: asyncio.Event) -> None:
        async for resp in call:
            if resp.need_snapshot:
                log.info("kvcache asks for a snapshot: %s", resp.reason)
                resync.set()
