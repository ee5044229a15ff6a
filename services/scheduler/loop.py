"""The engine loop, free of grpc: the one loop of both the scheduler service and
the in-process Engine, which differ only in how plans reach the executor.

A step: plan the next StepPlan and hand it to the executor while the previous
one runs (pipelined, `pipeline_depth` 2; 1 = serial), then take the oldest
result, reconcile it (`Scheduler.update`) and deliver the outputs. The critical
path of a step is one `submit` and one `result`; outputs go to `emit(owner,
items)` without waiting on anyone, and nothing else (block events, metrics)
runs in the step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from llmesh.observability import telemetry
from llmesh.observability.request_spans import RequestSpans, StepSpans
from llmesh.services.common.errors import DrainingError, DuplicateRequestError, InvalidRequestError
from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.step_plan import StepPlan, StepResult, sequence_id
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.scheduler.replica_state import ReplicaState, State
from llmesh.services.scheduler.kv_manager import KVCacheManager
from llmesh.services.scheduler.policy import QueueFullError
from llmesh.services.scheduler.scheduler import Scheduler, SeqOutput
from llmesh.services.scheduler.sequence import Sequence
from llmesh.services.scheduler.slo import WaitPredictor
from llmesh.services.scheduler.tracking import FinishedInfo, RequestTrack, RequestTracks
from llmesh.services.scheduler.text_stream import TextStream

log = logging.getLogger("llmesh.scheduler")


class ExecutorFailed(Exception):
    """The executor group failed a step; what it held is lost."""


class Executor(Protocol):
    """Where plans run: results come back in the order plans were submitted."""

    async def submit(self, plan: StepPlan) -> None: ...

    async def result(self) -> StepResult: ...

    def check(self) -> None:
        """Raise ExecutorFailed when the executor is known to be gone."""


@dataclass
class LoopStats:
    num_steps: int = 0
    num_tokens: int = 0
    schedule_s: float = 0.0  # planning and reconciling, on the loop
    executor_rpc_s: float = 0.0  # the loop waiting for results (the rest is hidden)
    forward_s: float = 0.0
    sample_s: float = 0.0
    comm_s: float = 0.0
    num_rejected: int = 0  # refused at admission: queue full, or predicted past its budget
    num_deadline_expired: int = 0  # queued past their deadline, never computed
    num_slo_rejected: int = 0  # refused because their predicted wait passed the class budget
    num_admitted: int = 0  # requests admitted
    num_kv_resets: int = 0  # prefix cache dropped because the executors' KV was lost
    num_requeued: int = 0  # running sequences requeued by an executor failure


@dataclass
class _InFlight:
    plan: StepPlan
    planned_s: float
    spans: StepSpans | None


Emit = Callable[[str, list[tuple[SeqOutput, FinishedInfo | None]]], None]


class EngineLoop:
    def __init__(self, scheduler: Scheduler, executor: Executor, vocab_size: int, *,
                 emit: Emit | None = None, tokenizer: TextTokenizer | None = None,
                 model: str = "", pipeline_depth: int = 2, max_step_failures: int = 2,
                 step_timeout_s: float = 0.0,
                 observe_step: Callable[[float], None] | None = None,
                 waits: WaitPredictor | None = None, state: ReplicaState | None = None,
                 plan_first: bool = False):
        """`emit(owner, [(output, finished_info)])` receives each step's outputs per
        owner; `observe_step(seconds)` each step's wall time (metrics, publishers).
        `waits` measures the replica's rates and predicts queue waits (SLO
        admission, retry pushback, the hung-step timeout); by default one over
        `scheduler`. `state`: the replica's lifecycle (services/scheduler/
        replica_state.py), which says whether it takes new requests; by default
        always SERVING (the in-process Engine).
        `step_timeout_s` (0 = none): a step whose result takes longer (or 20 times
        what its tokens should take, if more) fails the executor as hung.
        `plan_first`: after a result, send the next plans before delivering its
        outputs (the scheduler process: the executor starts the next step while the
        routers and clients take the tokens, which on a small machine want the
        core the plan's messages need); off, a step's outputs are out before the
        next plan is made (the in-process Engine's `step()`)."""
        assert pipeline_depth >= 1
        self.scheduler = scheduler
        self.kv: KVCacheManager = scheduler.kv
        self.executor = executor
        self.vocab_size = vocab_size
        self.emit = emit
        self.tokenizer = tokenizer
        self.pipeline_depth = pipeline_depth
        self.plan_first = plan_first
        self.max_step_failures = max_step_failures  # per sequence, before it fails with ERROR
        self.step_timeout_s = step_timeout_s
        self.observe_step = observe_step
        self.stats = LoopStats()
        self.spans = RequestSpans(model)  # no-op unless tracing is on and requests carry context
        self.waits = waits or WaitPredictor(scheduler)
        self.tracks = RequestTracks(scheduler, self.waits.calibration)
        self.state = state or ReplicaState(State.SERVING)
        self._in_flight: deque[_InFlight] = deque()
        self._last_result_s = 0.0
        self._wake = asyncio.Event()

    @property
    def max_kv_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    # ---- requests -----------------------------------------------------
    def add(self, request_id: str, prompt: list[int], params: SamplingParams, owner: str,
            deadline_s: float = 0.0, salt: str = "", traceparent: str = "",
            tenant: str = "", priority: str = "standard",
            resume: dict[int, list[int]] | None = None, arrival_unix_s: float = 0.0,
            has_ttft_budget: bool = True) -> None:
        """Queue a request validated at the edge (router or Engine). `resume`: a
        request moved from a failed replica; per unfinished choice (index) the output
        it already produced there, which it continues after. Only those choices run,
        each as its own sequence (n = 1: {0: tokens}). `arrival_unix_s`: when the edge
        received it (the TTFT budget counts from there); `has_ttft_budget=False`: an
        offline request, never refused for its class's latency budget. Raises DuplicateRequestError,
        InvalidRequestError when it cannot fit this replica, or QueueFullError (with
        retry_after_s) when its class's queue is full, or DrainingError while the
        replica drains."""
        if not self.state.takes_requests:
            raise DrainingError("this replica is draining to restart; another one takes it")
        if request_id in self.tracks:
            raise DuplicateRequestError(request_id)
        self._check_fits(prompt, params)
        params = params.with_seed()  # (the router's requests come with theirs)
        if resume:
            self._check_resume(resume, params)
        now = time.time()
        seqs = []
        for index, output in sorted((resume or {0: []}).items()):
            text = TextStream(self.tokenizer, params.stop) if self.tokenizer else None
            if text is not None and output:
                text.push(list(output))  # the client has this text (or it is held back, as before)
            seqs.append(Sequence(seq_id=sequence_id(request_id, index), request_id=request_id,
                                 index=index, prompt_token_ids=list(prompt), params=params,
                                 arrival_s=now, salt=salt, tenant=tenant,
                                 priority=priority, output_token_ids=list(output), text=text))
        try:
            spent_s = min(max(0.0, now - arrival_unix_s), 3600.0) if arrival_unix_s else 0.0
            predicted_ttft_s = self.waits.check_budget(
                priority, sum(q.num_tokens for q in seqs), spent_s) if has_ttft_budget else None
            self.scheduler.add(*seqs)
        except QueueFullError as e:
            self.stats.num_rejected += 1
            self.stats.num_slo_rejected += e.reason == "slo"
            if not e.retry_after_s:
                e.retry_after_s = self.waits.pushback_s(priority)
            raise
        self.stats.num_admitted += 1
        self.tracks.add(request_id, RequestTrack(owner, now, deadline_s,
                                                 predicted_ttft_s=predicted_ttft_s))
        self.spans.add(request_id, traceparent, len(prompt), params.max_tokens, params.n)
        self._wake.set()

    def _check_resume(self, resume: dict[int, list[int]], params: SamplingParams) -> None:
        """A moved request's choices: n = 1 resumes choice 0; n > 1 its unfinished
        choices, each past its fork (at least one token); none at its max_tokens, and
        only tokens of this vocabulary."""
        ok = set(resume) == {0} if params.n == 1 else \
            (set(resume) <= set(range(params.n)) and all(resume.values()))
        if not ok or any(len(out) >= params.max_tokens or
                         any(not 0 <= t < self.vocab_size for t in out)
                         for out in resume.values()):
            raise InvalidRequestError("resume", "only unfinished choices of this request "
                                      "(n > 1: each with its first token) with tokens of "
                                      "this vocabulary can resume")

    def _check_fits(self, prompt: list[int], params: SamplingParams) -> None:
        """What the edge cannot know for sure: this replica's own limits."""
        if len(prompt) + params.max_tokens > min(self.scheduler.config.max_model_len,
                                                 self.max_kv_tokens):
            raise InvalidRequestError("max_tokens", "prompt + max_tokens does not fit this "
                                      "replica's context or KV cache")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer")

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.ABORT
               ) -> list[SeqOutput]:
        if request_id not in self.tracks:
            return []
        outputs = self.scheduler.abort(request_id, reason)
        self._deliver(outputs)
        self._wake.set()  # the executor must hear about the dropped sequences
        return outputs

    def cancel_owner(self, owner: str) -> None:
        for request_id in self.tracks.of_owner(owner):
            self.cancel(request_id)

    def fail_all(self, reason: FinishReason = FinishReason.ERROR) -> None:
        for request_id in list(self.tracks):
            self.cancel(request_id, reason)

    def invalidate_kv(self, reason: str, requeue: bool = True) -> None:
        """The executors' KV memory can no longer be trusted (a rank restarted, or
        failed mid-step): the steps in flight are lost, running sequences go back to
        the queue to be recomputed (`requeue`) or fail, and every cached prefix is
        forgotten, so no later request is served from blocks the executors never
        computed."""
        log.warning("dropping the prefix cache: %s", reason)
        now = telemetry.now_ns()
        while self._in_flight:
            self.spans.step_finished(self._in_flight.popleft().spans, now)
        if requeue:
            self.stats.num_requeued += len(self.scheduler.running)
            self._deliver(self.scheduler.requeue_running(self.max_step_failures))
        else:
            self.scheduler.discard_in_flight()
            self.fail_all()
        self.kv.reset_prefix_cache()
        self.stats.num_kv_resets += 1

    @property
    def is_idle(self) -> bool:
        """Nothing queued, running or in flight."""
        return not self.tracks and not self.has_work

    def wake(self) -> None:
        self._wake.set()

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.num_unfinished or self.scheduler.has_dropped()
                    or self._in_flight)

    # ---- stepping -----------------------------------------------------
    async def run(self) -> None:
        """Step while there is work; sleep on the wake event when there is none.
        Raises ExecutorFailed when the executor goes away."""
        while True:
            self.executor.check()
            if not self.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not await self.step() and not self._in_flight:
                # work that cannot start now (blocks held elsewhere): wait for a change,
                # but look again soon for deadlines
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass

    async def step(self) -> list[SeqOutput]:
        """Send plans until `pipeline_depth` are in flight, reconcile the oldest (with
        `plan_first`, send plans again), then deliver its outputs. Returns them ([]
        when nothing could run)."""
        self.expire_deadlines()
        while len(self._in_flight) < self.pipeline_depth:
            if not await self._submit_next():
                break
        if not self._in_flight:
            return []
        outputs = await self._complete_oldest()
        while self.plan_first and len(self._in_flight) < self.pipeline_depth:
            if not await self._submit_next():
                break
        self._deliver(outputs)
        if not self._in_flight and not self.scheduler.num_unfinished \
                and self.scheduler.has_dropped():
            await self._submit_next()  # idle: the executor forgets finished sequences now
            self._deliver(await self._complete_oldest())
        return outputs

    async def _submit_next(self) -> bool:
        t0 = time.perf_counter()
        waiting = self.scheduler.waiting
        queued_before = waiting.num_queued_tokens
        plan = self.scheduler.schedule()
        # capacity shows only while requests are left waiting: since the last round
        # left some behind, what leaves now left as fast as the replica could take it
        self.waits.observe_round(queued_before - waiting.num_queued_tokens)
        if not plan.scheduled and not plan.finished_seq_ids:
            self.stats.schedule_s += time.perf_counter() - t0
            return False
        spans = token = None
        if self.spans.active:
            spans = self.spans.step_started(plan, self.scheduler.seqs, time.time_ns())
            if spans is not None and spans.span is not None:
                ctx = trace.set_span_in_context(spans.span)
                plan.traceparent = telemetry.inject(ctx)
                token = otel_context.attach(ctx)
        self.tracks.on_planned(plan, time.time())
        self.stats.schedule_s += time.perf_counter() - t0
        try:
            self._in_flight.append(_InFlight(plan, time.perf_counter(), spans))
            await self.executor.submit(plan)
        finally:
            if token is not None:
                otel_context.detach(token)
        return True

    def _result_timeout(self) -> float | None:
        """How long the oldest step may take before the executor counts as hung: many
        times what its tokens should take at the measured rate, never under the floor."""
        if not self.step_timeout_s:
            return None
        oldest = self._in_flight[0]
        rate = self.waits.token_rate
        expected = oldest.plan.num_tokens / rate if rate else 0.0
        waited = time.perf_counter() - oldest.planned_s
        return max(self.step_timeout_s, 20 * expected) - waited

    async def _complete_oldest(self) -> list[SeqOutput]:
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.executor.result(), self._result_timeout())
        except asyncio.TimeoutError:
            raise ExecutorFailed(f"step {self._in_flight[0].plan.step_id} got no result in "
                                 f"{time.perf_counter() - self._in_flight[0].planned_s:.1f}s: "
                                 "the executor is hung") from None
        t1 = time.perf_counter()
        done = self._in_flight.popleft()
        plan = done.plan
        self.stats.executor_rpc_s += t1 - t0
        num_tokens = plan.num_tokens
        if num_tokens:
            since = t1 - max(self._last_result_s, done.planned_s)
            if since > 0:
                self.waits.observe_step(num_tokens, since)
            self._last_result_s = t1
        self.tracks.on_result(plan, result)
        outputs = self.scheduler.update(plan, result)
        self.spans.step_finished(done.spans, time.time_ns())
        s = self.stats
        s.num_steps += bool(num_tokens)  # (a plan may only tell the executor what to forget)
        s.num_tokens += num_tokens
        s.forward_s += result.forward_s
        s.sample_s += result.sample_s
        s.comm_s += result.comm_s
        t2 = time.perf_counter()
        s.schedule_s += t2 - t1
        if self.observe_step is not None:
            self.observe_step(t2 - done.planned_s)
        return outputs

    def expire_deadlines(self) -> None:
        """Requests past their deadline stop: still queued ones were never computed
        (they leave with DEADLINE and no tokens), running ones keep their partial output."""
        now = time.time()
        for request_id, track in self.tracks.past_deadline(now):
            if not track.first_scheduled_s:
                self.stats.num_deadline_expired += 1
            self.cancel(request_id, FinishReason.DEADLINE)

    def _deliver(self, outputs: list[SeqOutput]) -> None:
        by_owner: dict[str, list] = {}
        finished: dict[str, tuple[int, int, int]] = {}  # cached tokens, drafts, kept
        now = time.time()
        spans = self.spans if self.spans.active else None
        for out in outputs:
            track = self.tracks.get(out.request_id)
            if track is None:
                continue
            if spans is not None:
                spans.on_output(out.request_id, len(out.new_token_ids), int(now * 1e9))
            info = self.tracks.on_output(track, out, now)
            by_owner.setdefault(track.owner, []).append((out, info))
            if info is not None:
                _, drafts, kept = finished.get(out.request_id, (0, 0, 0))
                finished[out.request_id] = (out.num_cached_tokens, drafts + out.num_draft_tokens,
                                            kept + out.num_accepted_tokens)
        # (after every output: sequences of one request can finish in the same step)
        for request_id, (num_cached, drafts, kept) in finished.items():
            if not self.scheduler.has_request(request_id):
                track = self.tracks.pop(request_id)
                if spans is not None:
                    spans.finish(request_id, track.finish_reasons, num_cached, drafts, kept)
        if self.emit is not None:
            for owner, items in by_owner.items():
                self.emit(owner, items)
