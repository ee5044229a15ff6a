"""Executor gRPC servicer: StepPlans in, StepResults out, over one bidi stream.

Plans are pipelined: the scheduler sends the next one while the current step
runs. A reader task converts each plan as it arrives and hands it to the step
lane (services/executor/step_lane.py), which runs plans back to back, in order,
with no event-loop round trip between them, and prepares the next plan before
it hands back a result; results are converted and sent by the event loop while
the next step already runs."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from llmesh.v1 import executor_pb2, executor_pb2_grpc
from llmesh.observability import telemetry
from llmesh.observability.metrics import executor_metrics
from llmesh.services.common import convert
from llmesh.services.common.rss import current_rss_bytes
from llmesh.services.common.step_plan import StepPlan
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.step_lane import StepLane

log = logging.getLogger("llmesh.executor")
_END = object()


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, runner: asyncio.Future, on_fatal=None, rank: int = 0,
                 on_exit=None, test_leak_mb_per_step: float = 0.0):
        """`runner`: the ModelRunner, once the model is loaded (until then a stream
        is refused UNAVAILABLE)."""
        self._runner = runner
        self.rank = rank
        self.on_exit = on_exit  # a plan asked this rank to restart (the scheduler drained)
        self._exit_step: int | None = None
        self._rss_sampled_s = 0.0
        self.test_leak_bytes = int(test_leak_mb_per_step * 2**20)
        self.is_test_leaking = False  # (turned on by start_test_leak)
        self._test_leaked: list[bytes] = []
        self._forward_hist, self._comm_counter = executor_metrics()
        self._lock = asyncio.Lock()  # one scheduler drives a rank at a time
        # Tensor parallel: a step that fails on one rank leaves its peers inside a
        # collective, so the group cannot go on; `on_fatal` ends this process and
        # the supervisor restarts the whole group.
        self.on_fatal = on_fatal

    def start_test_leak(self) -> None:
        """Tests only: from now on each step keeps `test_leak_mb_per_step` MiB."""
        self.is_test_leaking = True

    async def Run(self, request_iterator, context):
        if not self._runner.done():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "executor is still loading the model")
        runner: ModelRunner = self._runner.result()
        async with self._lock:
            # a new stream means a (re)started scheduler: forget every sequence
            await asyncio.to_thread(runner.reset)
            results: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            worker = StepLane(runner, lambda plan, outcome: loop.call_soon_threadsafe(
                results.put_nowait, _END if plan is None else (plan, outcome)))
            spans: dict[int, object] = {}
            reader = asyncio.ensure_future(self._read(request_iterator, worker, spans))
            try:
                while (item := await results.get()) is not _END:
                    plan, outcome = item
                    reply = self._reply(plan, outcome, spans.pop(plan.step_id, None))
                    yield reply
                    if plan.step_id == self._exit_step and self.on_exit is not None:
                        log.warning("the scheduler drained this replica to restart it: exiting")
                        self.on_exit()
                        return
                    if reply.error:  # the scheduler starts over; plans queued after it are moot
                        if self.on_fatal is not None:
                            self.on_fatal(outcome)
                        return
            finally:
                reader.cancel()
                worker.stop()

    async def _read(self, request_iterator, worker: StepLane, spans: dict) -> None:
        try:
            async for msg in request_iterator:
                plan = convert.plan_from_proto(msg)
                if msg.exit_after:
                    self._exit_step = plan.step_id
                if plan.traceparent and telemetry.tracing_enabled():
                    spans[plan.step_id] = telemetry.tracer("llmesh.executor").start_span(
                        "executor.step", context=telemetry.extract(plan.traceparent),
                        attributes={"llmesh.step_id": plan.step_id, "llmesh.rank": self.rank,
                                    "llmesh.step.num_tokens": plan.num_tokens})
                worker.submit(plan)
        finally:
            worker.stop()

    def _reply(self, plan: StepPlan, outcome, span) -> executor_pb2.StepResult:
        if isinstance(outcome, Exception):
            if span is not None:
                span.record_exception(outcome)
                span.end()
            return executor_pb2.StepResult(step_id=plan.step_id, error=repr(outcome))
        if span is not None:
            span.set_attributes({"llmesh.forward_s": outcome.forward_s,
                                 "llmesh.sample_s": outcome.sample_s,
                                 "llmesh.comm_s": outcome.comm_s})
            span.end()
        if plan.scheduled:
            self._forward_hist.observe(outcome.forward_s)
            if outcome.comm_s:
                self._comm_counter.inc(outcome.comm_s)
            if self.is_test_leaking:  # tests only: memory that is never given back
                self._test_leaked.append(b"\x01" * self.test_leak_bytes)
        reply = convert.result_to_proto(outcome)
        now = time.monotonic()
        if now - self._rss_sampled_s >= 1.0:  # (the leak watchdog looks every few seconds)
            self._rss_sampled_s = now
            reply.rss_bytes = current_rss_bytes()
        return reply
