"""The replica's engine loop, free of grpc: schedule -> execute -> update, per step.

The executor group and the kvcache service are reached through two async
callables, so the same loop runs against real services or in-process stand-ins.
Per step: one `execute(plan)` (one message to each rank, one back) and one
`commit(step_id, ops)` with every KV change since the last step, sent
concurrently. Outputs go to `emit(owner, deltas)` once per step per owner.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace

from observability import telemetry
from observability.request_spans import RequestSpans
from services.common.errors import DuplicateRequestError
from services.common.sampling_params import SamplingParams, validate_request
from services.common.step_plan import StepPlan, StepResult
from services.kvcache.manager import KVCacheManager
from services.scheduler.policy import QueueFullError
from services.scheduler.scheduler import Scheduler, SeqOutput
from services.scheduler.sequence import FinishReason, Sequence

log = logging.getLogger("llmesh.scheduler")


@dataclass
class RequestTrack:
    owner: str
    arrival_s: float
    deadline_s: float  # time.time() based; 0 = none
    first_scheduled_s: float = 0.0
    first_token_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    num_steps: int = 0
    finish_reasons: list = field(default_factory=list)


@dataclass
class FinishedInfo:
    """Usage and timings attached to a sequence's last delta."""

    queue_s: float
    ttft_s: float
    e2e_s: float
    forward_s: float
    sample_s: float
    num_steps: int


@dataclass
class LoopStats:
    num_steps: int = 0
    schedule_s: float = 0.0
    kv_rpc_s: float = 0.0
    executor_rpc_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    comm_s: float = 0.0
    num_rejected: int = 0  # refused at admission: queue full
    num_deadline_expired: int = 0  # queued past their deadline, never computed
    num_kv_resets: int = 0  # prefix cache dropped because the executors' KV was lost
    num_requeued: int = 0  # running sequences requeued by an executor failure


class ExecutorFailed(Exception):
    """The executor group failed a step; in-flight requests cannot continue."""


class EngineLoop:
    def __init__(self, scheduler: Scheduler, vocab_size: int,
                 execute: Callable[[StepPlan], Awaitable[StepResult]],
                 commit: Callable[[int, list[tuple]], Awaitable[None]],
                 emit: Callable[[str, list[tuple[SeqOutput, FinishedInfo | None]]], None],
                 model: str = "", max_step_failures: int = 2):
        self.scheduler = scheduler
        self.max_step_failures = max_step_failures  # per sequence, before it fails with ERROR
        self.kv: KVCacheManager = scheduler.kv
        self.kv.journal = []
        self.vocab_size = vocab_size
        self.execute = execute
        self.commit = commit
        self.emit = emit
        self.tracks: dict[str, RequestTrack] = {}
        self.stats = LoopStats()
        self._wake = asyncio.Event()
        self.spans = RequestSpans(model)  # no-op unless tracing is on and requests carry context
        self.observe_step: Callable[[float], None] | None = None  # e.g. a Prometheus histogram
        self.token_rate = 0.0  # tokens per second computed, smoothed (retry pushback)

    @property
    def max_kv_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, owner: str,
            seed: int, deadline_s: float = 0.0, salt: str = "", traceparent: str = "",
            tenant: str = "", priority: str = "standard") -> None:
        """Queue a request. Raises LlmeshError subclasses: invalid, duplicate, or
        QueueFullError (with retry_after_s) when its class's queue is at its bound."""
        validate_request(prompt, params, self.vocab_size, self.scheduler.config.max_model_len,
                         self.max_kv_tokens)
        if request_id in self.tracks:
            raise DuplicateRequestError(request_id)
        now = time.time()
        seq = Sequence(seq_id=request_id, request_id=request_id, index=0,
                       prompt_token_ids=list(prompt), params=params, seed=seed, arrival_s=now,
                       salt=salt, tenant=tenant, priority=priority)
        try:
            self.scheduler.add(seq)
        except QueueFullError as e:
            self.stats.num_rejected += 1
            queued = self.scheduler.waiting.queued_tokens.get(priority, 0)
            # pushback: about the time the class's queued prompt tokens take to compute
            e.retry_after_s = min(30.0, max(0.05, queued / self.token_rate if self.token_rate
                                            else 1.0))
            raise
        self.tracks[request_id] = RequestTrack(owner, now, deadline_s)
        self.spans.add(request_id, traceparent, len(prompt), params.max_tokens, params.n)
        self._wake.set()

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        track = self.tracks.get(request_id)
        if track is None:
            return
        outputs = self.scheduler.abort(request_id, reason)
        self._deliver(outputs)
        self._wake.set()  # the executor must hear about the dropped sequences

    def cancel_owner(self, owner: str) -> None:
        for request_id in [r for r, t in self.tracks.items() if t.owner == owner]:
            self.cancel(request_id)

    def fail_all(self, reason: FinishReason = FinishReason.ERROR) -> None:
        for request_id in list(self.tracks):
            self.cancel(request_id, reason)

    def invalidate_kv(self, reason: str, requeue: bool = True) -> None:
        """The executors' KV memory can no longer be trusted (a rank restarted, or
        failed mid-step). Running sequences go back to the queue to be recomputed
        (`requeue`) or fail, and every cached prefix is forgotten, so no later
        request is served from blocks the executors never computed."""
        log.warning("dropping the prefix cache: %s", reason)
        if requeue:
            self.stats.num_requeued += len(self.scheduler.running)
            self._deliver(self.scheduler.requeue_running(self.max_step_failures))
        else:
            self.fail_all()
        self.kv.reset_prefix_cache()
        self.stats.num_kv_resets += 1

    def wake(self) -> None:
        self._wake.set()

    async def run(self, check: Callable[[], None] = lambda: None) -> None:
        """Step while there is work. `check` raises when the executors are gone,
        so a failure seen while idle ends the loop before the next request."""
        while True:
            check()
            if not self.scheduler.num_unfinished and not self.scheduler.has_dropped():
                self._wake.clear()
                await self._wake.wait()
                check()
            await self.step()

    async def step(self) -> None:
        self.expire_deadlines()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        ops, self.kv.journal = self.kv.journal, []
        t1 = time.perf_counter()
        if not plan.scheduled and not plan.finished_seq_ids:
            if ops:
                await self._commit(plan.step_id, ops)
            await asyncio.sleep(0.001)
            return
        step_span = token = None
        if self.spans.active:
            step_span = self.spans.step_started(plan, self.scheduler.seqs, time.time_ns())
            if step_span is not None:
                ctx = trace.set_span_in_context(step_span)
                plan.traceparent = telemetry.inject(ctx)
                token = otel_context.attach(ctx)  # the kvcache commit is part of the step
        try:
            exec_task = asyncio.ensure_future(self._execute(plan))
            await self._commit(plan.step_id, ops)
            result = await exec_task
        except BaseException:
            if step_span is not None:  # the executor group failed: close the step's spans
                self.spans.step_finished(step_span, time.time_ns())
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        t2 = time.perf_counter()
        num_tokens = sum(s.num_new_tokens for s in plan.scheduled)
        if num_tokens and t2 > t0:
            rate = num_tokens / (t2 - t0)
            self.token_rate = rate if not self.token_rate else 0.9 * self.token_rate + 0.1 * rate
        now = time.time()
        for sched in plan.scheduled:
            track = self.tracks.get(self.scheduler.seqs[sched.seq_id].request_id) \
                if sched.seq_id in self.scheduler.seqs else None
            if track is not None:
                track.first_scheduled_s = track.first_scheduled_s or now
                track.forward_s += result.forward_s
                track.sample_s += result.sample_s
                track.num_steps += 1
        outputs = self.scheduler.update(plan, result)
        self._deliver(outputs)
        if step_span is not None:
            self.spans.step_finished(step_span, time.time_ns())
        if self.observe_step is not None:
            self.observe_step(time.perf_counter() - t0)
        s = self.stats
        s.num_steps += 1
        s.schedule_s += (t1 - t0) + (time.perf_counter() - t2)
        s.forward_s += result.forward_s
        s.sample_s += result.sample_s
        s.comm_s += result.comm_s

    async def _execute(self, plan: StepPlan) -> StepResult:
        t = time.perf_counter()
        try:
            return await self.execute(plan)
        finally:
            self.stats.executor_rpc_s += time.perf_counter() - t

    async def _commit(self, step_id: int, ops: list[tuple]) -> None:
        t = time.perf_counter()
        try:
            await self.commit(step_id, ops)
        except Exception:  # the kvcache service mirrors state; the step goes on without it
            log.exception("kvcache commit of step %d failed", step_id)
        finally:
            self.stats.kv_rpc_s += time.perf_counter() - t

    def expire_deadlines(self) -> None:
        """Requests past their deadline stop: still queued ones were never computed
        (they leave with DEADLINE and no tokens), running ones keep their partial output."""
        now = time.time()
        for request_id, track in list(self.tracks.items()):
            if track.deadline_s and now >= track.deadline_s:
                if not track.first_scheduled_s:
                    self.stats.num_deadline_expired += 1
                self.cancel(request_id, FinishReason.DEADLINE)

    def _deliver(self, outputs: list[SeqOutput]) -> None:
        by_owner: dict[str, list] = {}
        now = time.time()
        spans = self.spans if self.spans.active else None
        for out in outputs:
            track = self.tracks.get(out.request_id)
            if track is None:
                continue
            if spans is not None:
                spans.on_output(out.request_id, len(out.new_token_ids), int(now * 1e9))
            if out.new_token_ids and not track.first_token_s:
                track.first_token_s = now
            info = None
            if out.finish_reason is not None:
                info = FinishedInfo(
                    queue_s=(track.first_scheduled_s or now) - track.arrival_s,
                    ttft_s=(track.first_token_s or now) - track.arrival_s,
                    e2e_s=now - track.arrival_s, forward_s=track.forward_s,
                    sample_s=track.sample_s, num_steps=track.num_steps)
            by_owner.setdefault(track.owner, []).append((out, info))
            if out.finish_reason is not None:
                track.finish_reasons.append(out.finish_reason.value)
                if not self.scheduler.has_request(out.request_id):
                    del self.tracks[out.request_id]
                    if spans is not None:
                        spans.finish(out.request_id, track.finish_reasons, out.num_cached_tokens)
        for owner, items in by_owner.items():
            self.emit(owner, items)
