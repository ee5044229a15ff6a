"""Executor gRPC servicer: StepPlans in, StepResults out, over one bidi stream.

Plans are pipelined: the scheduler sends the next one while the current step
runs, so a reader task converts each plan as it arrives while the step runs in
its thread, and steps run strictly in order."""
from __future__ import annotations

import asyncio
import logging

import grpc

from llmesh.v1 import executor_pb2, executor_pb2_grpc
from observability import telemetry
from observability.metrics import executor_metrics
from services.common import convert
from services.executor.runner import ModelRunner

log = logging.getLogger("llmesh.executor")
_END = object()


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, runner: ModelRunner | None, on_fatal=None, rank: int = 0):
        self.runner = runner  # set once the model is loaded
        self.rank = rank
        self._forward_hist, self._comm_counter = executor_metrics()
        self._lock = asyncio.Lock()  # one scheduler drives a rank at a time
        # Tensor parallel: a step that fails on one rank leaves its peers inside a
        # collective, so the group cannot go on; `on_fatal` ends this process and
        # the supervisor restarts the whole group.
        self.on_fatal = on_fatal

    async def Run(self, request_iterator, context):
        if self.runner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "executor is still loading the model")
        async with self._lock:
            # a new stream means a (re)started scheduler: forget every sequence
            await asyncio.to_thread(self.runner.reset)
            plans: asyncio.Queue = asyncio.Queue()
            reader = asyncio.ensure_future(self._read(request_iterator, plans))
            try:
                while (plan := await plans.get()) is not _END:
                    result = await self._step(plan)
                    yield result
                    if result.error:  # the scheduler starts over; plans queued after it are moot
                        return
            finally:
                reader.cancel()

    @staticmethod
    async def _read(request_iterator, plans: asyncio.Queue) -> None:
        try:
            async for msg in request_iterator:
                plans.put_nowait(convert.plan_from_proto(msg))
        finally:
            plans.put_nowait(_END)

    async def _step(self, plan) -> executor_pb2.StepResult:
        span = None
        if plan.traceparent and telemetry.tracing_enabled():
            span = telemetry.tracer("llmesh.executor").start_span(
                "executor.step", context=telemetry.extract(plan.traceparent),
                attributes={"llmesh.step_id": plan.step_id, "llmesh.rank": self.rank,
                            "llmesh.step.num_tokens": plan.num_tokens})
        try:
            result = await asyncio.to_thread(self.runner.execute, plan)
        except Exception as e:  # a bug: report it on this step (the scheduler recovers)
            if span is not None:
                span.record_exception(e)
                span.end()
            log.exception("step %d failed", plan.step_id)
            await asyncio.to_thread(self.runner.reset)
            if self.on_fatal is not None:
                self.on_fatal(e)
            return executor_pb2.StepResult(step_id=plan.step_id, error=repr(e))
        if span is not None:
            span.set_attributes({"llmesh.forward_s": result.forward_s,
                                 "llmesh.sample_s": result.sample_s,
                                 "llmesh.comm_s": result.comm_s})
            span.end()
        if plan.scheduled:
            self._forward_hist.observe(result.forward_s)
            if result.comm_s:
                self._comm_counter.inc(result.comm_s)
        return convert.result_to_proto(result)
