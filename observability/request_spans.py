"""The scheduler's spans for each request and each engine step.

    scheduler.request            (child of the router's span, via AddRequest.traceparent)
      queue                      arrival -> first scheduled
      prefill                    first scheduled -> first token
        prefill.chunk            one per step that computed part of the prompt
      decode                     first token -> finish; events: first_token, preemption, resume
    engine.step                  one per step; parent: the first traced request in the batch,
                                 links: every traced request it served; the executor's
                                 `executor.step` spans are its children (StepPlan.traceparent)

Attributes follow the GenAI semantic conventions (gen_ai.request.model,
gen_ai.request.max_tokens, gen_ai.usage.input_tokens / output_tokens,
gen_ai.response.finish_reasons) plus llmesh.request_id, and with speculative
decoding llmesh.spec.draft_tokens / llmesh.spec.accepted_tokens on the request
and llmesh.step.num_draft_tokens on the step. No token ids or text.
Only requests that arrive with a sampled trace context get spans; without
tracing every call here returns at once.
"""
from __future__ import annotations

import os

from dataclasses import dataclass

from opentelemetry import trace

from llmesh.observability import telemetry

MAX_LINKS = 64


@dataclass
class _Request:
    span: trace.Span
    ctx: object  # context with `span` current
    queue: trace.Span | None
    prefill: trace.Span | None = None
    decode: trace.Span | None = None
    preempted: bool = False
    num_output_tokens: int = 0


@dataclass
class StepSpans:
    """The spans of one step in flight (steps overlap when pipelined)."""

    span: trace.Span | None  # engine.step (None: a decode step left unsampled)
    chunks: list[trace.Span]  # prefill.chunk spans it computes


class RequestSpans:
    def __init__(self, model: str, decode_step_every: int | None = None):
        self.model = model
        # a step that only decodes gets its engine.step span (and so executor.step)
        # every this many steps; steps with prompt work always do
        self.decode_step_every = max(1, decode_step_every if decode_step_every is not None
                                     else int(os.environ.get("LLMESH_DECODE_STEP_EVERY", "1")))
        self.live: dict[str, _Request] = {}

    @property
    def active(self) -> bool:
        return bool(self.live)

    def add(self, request_id: str, traceparent: str, num_prompt_tokens: int, max_tokens: int,
            n: int) -> None:
        if not traceparent or not telemetry.tracing_enabled():
            return
        tracer = telemetry.tracer("llmesh.scheduler")
        span = tracer.start_span("scheduler.request", context=telemetry.extract(traceparent),
                                 attributes={
                                     "llmesh.request_id": request_id,
                                     "gen_ai.operation.name": "text_completion",
                                     "gen_ai.request.model": self.model,
                                     "gen_ai.request.max_tokens": max_tokens,
                                     "gen_ai.request.choice.count": n,
                                     "gen_ai.usage.input_tokens": num_prompt_tokens})
        if not span.get_span_context().trace_flags.sampled:
            return
        ctx = trace.set_span_in_context(span)
        self.live[request_id] = _Request(span, ctx, tracer.start_span("queue", context=ctx))

    def step_started(self, plan, seqs, now_ns: int) -> StepSpans | None:
        """Per scheduled sequence: queue ends, prefill starts, preemption / resume events.
        Called when the step is planned (sequences already advanced past it). Returns
        the step's spans (or None); `.span` is made current while the step is sent."""
        if not self.live:
            return None
        tracer = telemetry.tracer("llmesh.scheduler")
        for seq_id in plan.finished_seq_ids:  # preempted now: back to waiting, state dropped
            seq = seqs.get(seq_id)
            req = self.live.get(seq.request_id) if seq is not None else None
            if req is not None and seq.status.value == "waiting":
                req.preempted = True
                (req.decode or req.prefill or req.span).add_event("preemption", timestamp=now_ns)
        served = []
        chunks = []
        has_prompt_work = bool(plan.new)
        for sched in plan.scheduled:
            seq = seqs.get(sched.seq_id)
            req = self.live.get(seq.request_id) if seq is not None else None
            if req is None:
                continue
            served.append(req)
            if req.queue is not None:
                has_prompt_work = True
                req.queue.end(end_time=now_ns)
                req.queue = None
                req.prefill = tracer.start_span("prefill", context=req.ctx, start_time=now_ns)
            if req.preempted:
                req.preempted = False
                (req.decode or req.prefill or req.span).add_event("resume", timestamp=now_ns)
            start = seq.num_computed - sched.num_new_tokens  # planned: already advanced
            if start < seq.num_prompt_tokens and req.prefill is not None:
                has_prompt_work = True
                chunks.append(tracer.start_span(
                    "prefill.chunk", context=trace.set_span_in_context(req.prefill),
                    start_time=now_ns, attributes={"llmesh.chunk.start": start,
                                                   "llmesh.chunk.tokens": sched.num_new_tokens}))
        if not served:
            return None
        span = None
        if has_prompt_work or not plan.step_id % self.decode_step_every:
            links = [trace.Link(r.span.get_span_context()) for r in served[:MAX_LINKS]]
            span = tracer.start_span(
                "engine.step", context=served[0].ctx, start_time=now_ns, links=links,
                attributes={"llmesh.step_id": plan.step_id,
                            "llmesh.step.num_seqs": len(plan.scheduled),
                            "llmesh.step.num_tokens": plan.num_tokens,
                            "llmesh.step.num_new_seqs": len(plan.new),
                            "llmesh.step.num_draft_tokens": sum(
                                len(s.draft_token_ids) for s in plan.scheduled)})
        return StepSpans(span, chunks) if span is not None or chunks else None

    def step_finished(self, spans: StepSpans | None, now_ns: int) -> None:
        if spans is None:
            return
        for chunk in spans.chunks:
            chunk.end(end_time=now_ns)
        if spans.span is not None:
            spans.span.end(end_time=now_ns)

    def on_output(self, request_id: str, num_new_tokens: int, now_ns: int) -> None:
        req = self.live.get(request_id)
        if req is None or not num_new_tokens:
            return
        req.num_output_tokens += num_new_tokens
        if req.decode is None:
            if req.prefill is not None:
                req.prefill.end(end_time=now_ns)
                req.prefill = None
            req.decode = telemetry.tracer("llmesh.scheduler").start_span(
                "decode", context=req.ctx, start_time=now_ns)
            req.decode.add_event("first_token", timestamp=now_ns)

    def finish(self, request_id: str, finish_reasons: list[str], num_cached_tokens: int,
               num_draft_tokens: int = 0, num_accepted_tokens: int = 0) -> None:
        req = self.live.pop(request_id, None)
        if req is None:
            return
        now = telemetry.now_ns()
        for span in (req.queue, req.prefill, req.decode):
            if span is not None:
                span.end(end_time=now)
        req.span.set_attributes({"gen_ai.response.finish_reasons": finish_reasons,
                                 "gen_ai.usage.output_tokens": req.num_output_tokens,
                                 "llmesh.usage.cached_prompt_tokens": num_cached_tokens})
        if num_draft_tokens:
            req.span.set_attributes({"llmesh.spec.draft_tokens": num_draft_tokens,
                                     "llmesh.spec.accepted_tokens": num_accepted_tokens})
        if any(r in ("error", "abort", "deadline") for r in finish_reasons):
            req.span.set_status(trace.Status(trace.StatusCode.ERROR, ",".join(finish_reasons)))
        req.span.end(end_time=now)
