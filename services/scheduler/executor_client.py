"""The scheduler's client of its executor group: one bidi `Run` stream per rank.

A step is one StepPlan written to every rank and one StepResult read back from
each (rank 0's carries the sampled tokens). Plans are pipelined: `submit`
writes the next plan while the current step runs, and `result` returns the
oldest outstanding one; the ranks run plans in order.
"""
from __future__ import annotations

import asyncio

import grpc

from llmesh.v1 import executor_pb2, executor_pb2_grpc
from llmesh.services.common import convert
from llmesh.services.common.step_plan import StepPlan, StepResult
from llmesh.services.scheduler.loop import ExecutorFailed


class ExecutorGroup:
    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self._streams: list = []
        self._channels: list[grpc.aio.Channel] = []
        self.connected = asyncio.Event()
        self.broken = ""  # why the group is unusable, once it is
        self.capacity = 0  # KV blocks: the minimum any rank reported
        self.kv_epochs: tuple[int, ...] = ()  # each rank's KV identity on this connection
        self.num_plan_messages = 0  # written, all ranks: the critical path out ...
        self.num_result_messages = 0  # ... and back
        self.rss_bytes: dict[str, int] = {}  # each rank's last reported resident memory

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

    async def submit(self, plan: StepPlan) -> None:
        if not self.connected.is_set():
            raise ExecutorFailed("executor group is not connected")
        self.check()
        msg = convert.plan_to_proto(plan)
        try:
            await asyncio.gather(*(s.write(msg) for s in self._streams))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self.broken = f"executor stream failed: {e!r}"
            raise ExecutorFailed(self.broken) from e
        self.num_plan_messages += len(self._streams)

    async def result(self) -> StepResult:
        reads = []
        try:
            # replies as they come: a rank that fails must not wait on its peers,
            # which may be stuck in a collective with it
            reads = [asyncio.ensure_future(s.read()) for s in self._streams]
            for done in asyncio.as_completed(reads):
                reply = await done
                if reply is grpc.aio.EOF:
                    raise ExecutorFailed("executor closed its stream")
                if reply.error:
                    raise ExecutorFailed(f"executor failed step {reply.step_id}: {reply.error}")
        except grpc.aio.AioRpcError as e:
            self.broken = f"executor stream failed: {e.code().name}"
            raise ExecutorFailed(self.broken) from e
        except ExecutorFailed as e:
            self.broken = str(e)
            raise
        finally:
            for r in reads:
                r.cancel()
        replies = [r.result() for r in reads]
        self.num_result_messages += len(replies)
        for rank, r in enumerate(replies):
            if r.rss_bytes:
                self.rss_bytes[f"executor-rank{rank}"] = r.rss_bytes
        self.capacity = min(r.num_kv_blocks for r in replies)
        epochs = tuple(r.kv_epoch for r in replies)
        if not self.kv_epochs:
            self.kv_epochs = epochs
        elif epochs != self.kv_epochs:  # cannot happen on one stream; never trust KV if it does
            self.broken = f"executor KV epoch changed at step {replies[0].step_id}"
            raise ExecutorFailed(self.broken)
        return convert.result_from_proto(replies[0])

    async def request_exit(self) -> None:
        """Ask every rank to restart (the replica is drained): each answers an empty
        plan and shuts down, and its supervisor starts it afresh; the group's loss is
        then seen as any other (the KV is gone, the scheduler reconnects)."""
        msg = executor_pb2.StepPlan(step_id=0, exit_after=True)
        try:
            await asyncio.gather(*(s.write(msg) for s in self._streams))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self.broken = f"executor stream failed: {e!r}"
        self.rss_bytes.clear()

    async def probe(self, timeout_s: float) -> StepResult:
        """An empty step through every rank (raises ExecutorFailed / TimeoutError)."""
        async def round_trip():
            await self.submit(StepPlan(step_id=0))
            return await self.result()
        return await asyncio.wait_for(round_trip(), timeout_s)
