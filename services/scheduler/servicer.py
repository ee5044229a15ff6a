"""Scheduler gRPC servicer and its typed clients to the executor group and kvcache."""
from __future__ import annotations

import asyncio
import itertools
import logging
import random

import grpc

from llmesh.v1 import (common_pb2, executor_pb2_grpc, kvcache_pb2, kvcache_pb2_grpc,
                       scheduler_pb2, scheduler_pb2_grpc)
from observability import telemetry
from services.common import convert
from services.common.errors import LlmeshError
from services.common.step_plan import StepPlan, StepResult
from services.kvcache.servicer import ops_to_proto
from services.scheduler.loop import EngineLoop, ExecutorFailed, FinishedInfo
from services.scheduler.scheduler import SeqOutput
from services.scheduler.sequence import FinishReason

log = logging.getLogger("llmesh.scheduler")

FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.DEADLINE: common_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class ExecutorGroup:
    """One bidi `Run` stream per rank; a step is one message to each, rank 0 answers."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self._streams: list = []
        self._channels: list[grpc.aio.Channel] = []
        self.connected = asyncio.Event()
        self.broken = ""  # why the group is unusable, once it is
        self.capacity = 0  # KV blocks: the minimum any rank reported
        self.kv_epochs: tuple[int, ...] = ()  # each rank's KV identity, as first seen on this connection

    async def connect(self) -> None:
        self.broken = ""
        self.kv_epochs = ()
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self._streams = [executor_pb2_grpc.ExecutorStub(c).Run(wait_for_ready=True)
                         for c in self._channels]
        self.connected.set()

    def check(self) -> None:
        if self.broken:
            raise ExecutorFailed(self.broken)

    async def watch(self, on_broken) -> None:
        """Notice a rank going away even when no step is in flight."""
        ready = grpc.ChannelConnectivity.READY
        states = [c.get_state(try_to_connect=True) for c in self._channels]
        while not self.broken:
            waits = [asyncio.ensure_future(c.wait_for_state_change(s))
                     for c, s in zip(self._channels, states)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            new = [c.get_state() for c in self._channels]
            for rank, (old, cur) in enumerate(zip(states, new)):
                if old == ready and cur != ready:
                    self.broken = f"executor rank {rank} connection lost ({cur.name})"
            states = new
        on_broken()

    async def close(self) -> None:
        self.connected.clear()
        for stream in self._streams:
            stream.cancel()
        for channel in self._channels:
            await channel.close()
        self._streams, self._channels = [], []

    async def execute(self, plan: StepPlan) -> StepResult:
        if not self.connected.is_set():
            raise ExecutorFailed("executor group is not connected")
        self.check()
        msg = convert.plan_to_proto(plan)
        reads = []
        try:
            await asyncio.gather(*(s.write(msg) for s in self._streams))
            # replies as they come: a rank that fails must not wait on its peers,
            # which may be stuck in a collective with it
            reads = [asyncio.ensure_future(s.read()) for s in self._streams]
            for done in asyncio.as_completed(reads):
                reply = await done
                if reply is grpc.aio.EOF:
                    raise ExecutorFailed("executor closed its stream")
                if reply.error:
                    raise ExecutorFailed(f"executor failed step {plan.step_id}: {reply.error}")
        except grpc.aio.AioRpcError as e:
            raise ExecutorFailed(f"executor stream failed: {e.code().name}") from e
        except ExecutorFailed as e:
            self.broken = str(e)
            raise
        finally:
            for r in reads:
                r.cancel()
        replies = [r.result() for r in reads]
        self.capacity = min(r.num_kv_blocks for r in replies)
        epochs = tuple(r.kv_epoch for r in replies)
        if not self.kv_epochs:
            self.kv_epochs = epochs
        elif epochs != self.kv_epochs:  # cannot happen on one stream; never trust KV if it does
            self.broken = f"executor KV epoch changed during step {plan.step_id}"
            raise ExecutorFailed(self.broken)
        return convert.result_from_proto(replies[0])


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: EngineLoop, info: scheduler_pb2.ReplicaInfo, tensor_parallel: int = 1):
        self.loop = loop
        self.info = info
        self.tensor_parallel = tensor_parallel
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner_ids = itertools.count()
        self._step_ids = itertools.count(1)
        self._rng = random.Random()
        loop.emit = self._emit

    def _emit(self, owner: str, items: list[tuple[SeqOutput, FinishedInfo | None]]) -> None:
        queue = self._queues.get(owner)
        if queue is None:
            return
        queue.put_nowait(scheduler_pb2.StepOutputs(
            step_id=next(self._step_ids), deltas=[_delta(out, info) for out, info in items]))

    async def Connect(self, request_iterator, context):
        owner = f"router-{next(self._owner_ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[owner] = queue
        reader = asyncio.ensure_future(self._read(owner, request_iterator, queue))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield get.result()
                    continue
                get.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                return
        finally:
            reader.cancel()
            self._queues.pop(owner, None)
            self.loop.cancel_owner(owner)  # the router went away: free its requests

    async def _read(self, owner: str, request_iterator, queue: asyncio.Queue) -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("msg")
            if kind == "add":
                add = msg.add
                params = convert.sampling_from_proto(add.sampling)
                seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
                try:
                    self.loop.add(add.request_id, list(add.prompt_token_ids), params, owner, seed,
                                  add.deadline_unix_s, add.salt, add.traceparent, add.tenant,
                                  convert.priority_from_proto(add.priority))
                except LlmeshError as e:
                    retry_ms = int(getattr(e, "retry_after_s", 0.0) * 1000)
                    queue.put_nowait(scheduler_pb2.StepOutputs(deltas=[scheduler_pb2.SeqDelta(
                        request_id=add.request_id, error=str(e), error_code=e.code,
                        retry_after_ms=retry_ms, finish_reason=common_pb2.FINISH_REASON_ABORT)]))
            elif kind == "cancel":
                self.loop.cancel(msg.cancel.request_id)

    async def GetInfo(self, request, context):
        return self.info

    async def GetStats(self, request, context):
        kv = self.loop.kv.stats()
        s = self.loop.stats
        return scheduler_pb2.ReplicaStats(
            num_running=len(self.loop.scheduler.running), num_waiting=len(self.loop.scheduler.waiting),
            kv_usage=kv.usage, kv_waste=kv.waste, prefix_hit_rate=kv.prefix_hit_rate,
            num_steps=s.num_steps, num_preemptions=self.loop.scheduler.num_preemptions,
            num_used_blocks=kv.num_used_blocks, schedule_s=s.schedule_s, kv_rpc_s=s.kv_rpc_s,
            executor_rpc_s=s.executor_rpc_s, forward_s=s.forward_s, sample_s=s.sample_s,
            comm_s=s.comm_s, tensor_parallel=self.tensor_parallel,
            waiting_by_class=self.loop.scheduler.waiting.depth, num_rejected=s.num_rejected,
            num_deadline_expired=s.num_deadline_expired, num_kv_resets=s.num_kv_resets,
            num_requeued=s.num_requeued)


def _delta(out: SeqOutput, info: FinishedInfo | None) -> scheduler_pb2.SeqDelta:
    delta = scheduler_pb2.SeqDelta(
        request_id=out.request_id, index=out.index, new_token_ids=out.new_token_ids,
        logprobs=[convert.logprob_to_proto(lp) for lp in out.logprobs],
        finish_reason=FINISH_TO_PROTO[out.finish_reason])
    if info is not None:
        delta.usage.CopyFrom(common_pb2.Usage(prompt_tokens=out.num_prompt_tokens,
                                              completion_tokens=out.num_output_tokens,
                                              cached_prompt_tokens=out.num_cached_tokens))
        delta.timings.CopyFrom(common_pb2.Timings(
            queue_s=info.queue_s, ttft_s=info.ttft_s, e2e_s=info.e2e_s, forward_s=info.forward_s,
            sample_s=info.sample_s, num_steps=info.num_steps))
    return delta


class KVCacheClient:
    def __init__(self, address: str):
        # one Commit per step: context goes in the message (an aio interceptor would
        # put a slower call path on every step)
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = kvcache_pb2_grpc.KVCacheStub(self.channel)

    async def commit(self, step_id: int, ops: list[tuple]) -> None:
        await self.stub.Commit(kvcache_pb2.CommitRequest(step_id=step_id, ops=ops_to_proto(ops),
                                                         traceparent=telemetry.inject()),
                               timeout=10)
