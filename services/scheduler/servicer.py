"""Scheduler gRPC servicer: routers' Connect streams in, StepOutputs out."""
from __future__ import annotations

import asyncio
import itertools
import time

from llmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from llmesh.services.common import convert
from llmesh.services.common.errors import LlmeshError
from llmesh.services.scheduler.executor_client import ExecutorGroup
from llmesh.services.scheduler.loop import EngineLoop
from llmesh.services.scheduler.tracking import FinishedInfo
from llmesh.services.scheduler.policy import CLASSES
from llmesh.services.scheduler.probe import KnownAnswerProbe
from llmesh.services.scheduler.replica_state import ReplicaState
from llmesh.services.scheduler.scheduler import Scheduler, SeqOutput
from llmesh.services.scheduler.slo import WaitPredictor


class OutputHub:
    """One queue per connected router; the loop's `emit` puts each step's deltas
    there as one StepOutputs message, never waiting on the router. Each message
    carries the replica's load (`load()`); `report_load` sends it alone to every
    router, so that each sees all routers' traffic."""

    def __init__(self, load=None):
        self.queues: dict[str, asyncio.Queue] = {}
        self.load = load or scheduler_pb2.ReplicaLoad
        self._step_ids = itertools.count(1)

    def emit(self, owner: str, items: list[tuple[SeqOutput, FinishedInfo | None]]) -> None:
        queue = self.queues.get(owner)
        if queue is not None:
            queue.put_nowait(scheduler_pb2.StepOutputs(
                step_id=next(self._step_ids), deltas=[_delta(out, info) for out, info in items],
                emitted_unix_s=time.time(), load=self.load()))

    async def report_load(self, every_s: float = 0.1) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self.queues:
                msg = scheduler_pb2.StepOutputs(load=self.load())
                for queue in self.queues.values():
                    if queue.empty():  # (a router that is behind has a fresh one queued)
                        queue.put_nowait(msg)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: EngineLoop, hub: OutputHub, executors: ExecutorGroup,
                 info: scheduler_pb2.ReplicaInfo, prober: KnownAnswerProbe, faults=None):
        """`faults` (tests only): a HalfFailing that fails some requests as lost."""
        self.faults = faults
        self.loop = loop
        self.hub = hub
        self.executors = executors
        self.info = info
        self.prober = prober
        self._owner_ids = itertools.count()

    async def Connect(self, request_iterator, context):
        owner = f"router-{next(self._owner_ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self.hub.queues[owner] = queue
        reader = asyncio.ensure_future(self._read(owner, request_iterator, queue))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    if (outputs := get.result()) is None:  # the scheduler stops
                        return
                    yield outputs
                    continue
                get.cancel()
                while not queue.empty():
                    if (outputs := queue.get_nowait()) is not None:
                        yield outputs
                return
        finally:
            reader.cancel()
            self.hub.queues.pop(owner, None)
            self.loop.cancel_owner(owner)  # the router went away: free its requests

    async def _read(self, owner: str, request_iterator, queue: asyncio.Queue) -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("msg")
            if kind == "add":
                add = msg.add
                if self.faults is not None and self.faults.fails_next():
                    queue.put_nowait(scheduler_pb2.StepOutputs(deltas=[scheduler_pb2.SeqDelta(
                        request_id=add.request_id, finish_reason=common_pb2.FINISH_REASON_ERROR)]))
                    continue
                params = convert.sampling_from_wire(add.sampling)
                try:
                    self.loop.add(add.request_id, list(add.prompt_token_ids), params, owner,
                                  add.deadline_unix_s, add.salt, add.traceparent, add.tenant,
                                  convert.priority_from_proto(add.priority),
                                  resume=_resume(add),
                                  arrival_unix_s=add.arrival_unix_s)
                except LlmeshError as e:
                    retry_ms = int(getattr(e, "retry_after_s", 0.0) * 1000)
                    queue.put_nowait(scheduler_pb2.StepOutputs(deltas=[scheduler_pb2.SeqDelta(
                        request_id=add.request_id, error=str(e), error_code=e.code,
                        error_reason=getattr(e, "reason", ""), retry_after_ms=retry_ms,
                        finish_reason=common_pb2.FINISH_REASON_ABORT)]))
            elif kind == "cancel":
                self.loop.cancel(msg.cancel.request_id)

    def close_streams(self) -> None:
        """End every router's stream (after a drain: nothing runs), so that a stopping
        server need not wait out its grace period on them."""
        for queue in self.hub.queues.values():
            queue.put_nowait(None)

    async def GetInfo(self, request, context):
        return self.info

    async def GetStats(self, request, context):
        kv = self.loop.kv.stats()
        s = self.loop.stats
        sched = self.loop.scheduler
        return scheduler_pb2.ReplicaStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            kv_usage=kv.usage, kv_waste=kv.waste, prefix_hit_rate=kv.prefix_hit_rate,
            num_steps=s.num_steps, num_preemptions=sched.num_preemptions,
            num_used_blocks=kv.num_used_blocks, num_kv_blocks=self.loop.kv.pool.num_blocks,
            schedule_s=s.schedule_s,
            executor_rpc_s=s.executor_rpc_s, forward_s=s.forward_s, sample_s=s.sample_s,
            comm_s=s.comm_s, tensor_parallel=len(self.executors.addresses),
            waiting_by_class=sched.waiting.depth, num_rejected=s.num_rejected,
            num_deadline_expired=s.num_deadline_expired, num_kv_resets=s.num_kv_resets,
            num_requeued=s.num_requeued, num_slo_rejected=s.num_slo_rejected,
            num_probes=self.prober.num_probes, num_probe_failures=self.prober.num_failures,
            is_ejected=self.loop.state.is_ejected, is_draining=self.loop.state.is_draining,
            pipeline_depth=self.loop.pipeline_depth,
            num_plan_messages=self.executors.num_plan_messages,
            num_result_messages=self.executors.num_result_messages,
            num_admitted=s.num_admitted, max_num_seqs=sched.config.max_num_seqs,
            predicted_wait_s={c: self.loop.waits.predict_wait(c) or 0.0 for c in CLASSES},
            ttft_budget_s={c: sched.waiting.policy.limits(c).ttft_budget_s for c in CLASSES})


def replica_load(sched: Scheduler, state: ReplicaState, waits: WaitPredictor | None = None
                 ) -> scheduler_pb2.ReplicaLoad:
    """The replica's load now (cheap: it rides on every StepOutputs); with `waits`, the
    classes it would refuse now (worked out at most every 50 ms)."""
    pool = sched.kv.pool
    return scheduler_pb2.ReplicaLoad(
        num_running=len(sched.running), num_waiting=len(sched.waiting),
        kv_usage=pool.num_used / pool.num_blocks if pool.num_blocks else 0.0,
        max_num_seqs=sched.config.max_num_seqs, is_draining=state.is_draining,
        refusing={c: scheduler_pb2.Refusal(reason=reason, retry_after_s=hint) for c, (reason, hint)
                  in waits.refusing(CLASSES).items()} if waits is not None else None)


def _delta(out: SeqOutput, info: FinishedInfo | None) -> scheduler_pb2.SeqDelta:
    delta = scheduler_pb2.SeqDelta(
        request_id=out.request_id, index=out.index, new_token_ids=out.new_token_ids,
        text=out.text, logprobs=[convert.logprob_to_proto(lp) for lp in out.logprobs],
        finish_reason=convert.FINISH_TO_PROTO[out.finish_reason])
    if info is not None:
        delta.usage.CopyFrom(common_pb2.Usage(prompt_tokens=out.num_prompt_tokens,
                                              completion_tokens=out.num_output_tokens,
                                              cached_prompt_tokens=out.num_cached_tokens))
        delta.timings.CopyFrom(common_pb2.Timings(
            queue_s=info.queue_s, ttft_s=info.ttft_s, e2e_s=info.e2e_s, forward_s=info.forward_s,
            sample_s=info.sample_s, num_steps=info.num_steps))
    return delta


def _resume(add: scheduler_pb2.AddRequest) -> dict[int, list[int]] | None:
    """A moved request's output so far, per unfinished choice (None: a new request)."""
    if add.resume_token_ids:
        return {0: list(add.resume_token_ids)}
    return {c.index: list(c.token_ids) for c in add.resume_choices} or None
