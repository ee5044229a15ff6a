"""Executor gRPC servicer: StepPlan in, StepResult out, over one bidi stream."""
from __future__ import annotations

import asyncio
import logging

import grpc

from llmesh.v1 import executor_pb2, executor_pb2_grpc
from services.common import convert
from services.executor.runner import ModelRunner

log = logging.getLogger("llmesh.executor")


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, runner: ModelRunner | None, on_fatal=None):
        self.runner = runner  # set once the model is loaded
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
            self.runner.seqs.clear()
            async for msg in request_iterator:
                plan = convert.plan_from_proto(msg)
                try:
                    result = await asyncio.to_thread(self.runner.execute, plan)
                except Exception as e:  # a bug: report it on this step, keep serving
                    log.exception("step %d failed", plan.step_id)
                    self.runner.seqs.clear()
                    yield executor_pb2.StepResult(step_id=plan.step_id, error=repr(e))
                    if self.on_fatal is not None:
                        self.on_fatal(e)
                    continue
                yield convert.result_to_proto(result)
