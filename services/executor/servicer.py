"""Executor gRPC servicer: StepPlan in, StepResult out, over one bidi stream."""
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
            async for msg in request_iterator:
                plan = convert.plan_from_proto(msg)
                span = None
                if plan.traceparent and telemetry.tracing_enabled():
                    span = telemetry.tracer("llmesh.executor").start_span(
                        "executor.step", context=telemetry.extract(plan.traceparent),
                        attributes={"llmesh.step_id": plan.step_id, "llmesh.rank": self.rank,
                                    "llmesh.step.num_tokens": plan.num_tokens})
                try:
                    result = await asyncio.to_thread(self.runner.execute, plan)
                except Exception as e:  # a bug: report it on this step, keep serving
                    if span is not None:
                        span.record_exception(e)
                        span.end()
                    log.exception("step %d failed", plan.step_id)
                    await asyncio.to_thread(self.runner.reset)
                    yield executor_pb2.StepResult(step_id=plan.step_id, error=repr(e))
                    if self.on_fatal is not None:
                        self.on_fatal(e)
                    continue
                if span is not None:
                    span.set_attributes({"llmesh.forward_s": result.forward_s,
                                         "llmesh.sample_s": result.sample_s,
                                         "llmesh.comm_s": result.comm_s})
                    span.end()
                if plan.scheduled:
                    self._forward_hist.observe(result.forward_s)
                    if result.comm_s:
                        self._comm_counter.inc(result.comm_s)
                yield convert.result_to_proto(result)
