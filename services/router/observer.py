"""Per-request router metrics and span attributes, fed with each response chunk."""
from __future__ import annotations

import time

from opentelemetry import trace

from llmesh.observability import telemetry
from llmesh.services.common import convert


class RequestObserver:
    """Per-request metrics and span attributes, fed with each chunk sent to the client."""

    def __init__(self, request_id: str, model: str, max_tokens: int):
        self.model = model
        self.t0 = time.perf_counter()
        self.first = self.last = 0.0
        self.span = trace.get_current_span()  # the gRPC server span (no-op without tracing)
        self.span.set_attributes({"llmesh.request_id": request_id, "gen_ai.request.model": model,
                                  "gen_ai.request.max_tokens": max_tokens,
                                  "gen_ai.operation.name": "text_completion"})
        self.stream_span = None
        self.finish_reasons: list[str] = []
        self.prompt_tokens = self.output_tokens = 0
        self.queue_s: float | None = None
        self.gaps: list[float] = []

    def on_chunk(self, resp) -> None:
        if resp.token_ids:
            now = time.perf_counter()
            if not self.first:
                self.first = now
                if telemetry.tracing_enabled():
                    self.stream_span = telemetry.tracer("llmesh.router").start_span("stream")
            else:
                self.gaps.append(now - self.last)
            self.last = now
        if resp.finish_reason:
            self.finish_reasons.append(convert.FINISH_NAMES[resp.finish_reason])
            self.prompt_tokens = resp.usage.prompt_tokens
            self.output_tokens += resp.usage.completion_tokens
            if self.queue_s is None and resp.HasField("timings"):
                self.queue_s = resp.timings.queue_s

    def finish(self, m, status: str) -> None:
        model = self.model
        if self.first:
            m.ttft.labels(model).observe(self.first - self.t0)
            m.e2e.labels(model).observe(self.last - self.t0)
            itl = m.itl.labels(model)
            for gap in self.gaps:
                itl.observe(gap)
        if self.queue_s is not None:
            m.queue.labels(model).observe(self.queue_s)
        m.requests.labels(model, self.finish_reasons[0] if self.finish_reasons else "none",
                          status).inc()
        m.prompt_tokens.labels(model).inc(self.prompt_tokens)
        m.generation_tokens.labels(model).inc(self.output_tokens)
        if self.stream_span is not None:
            self.stream_span.end()
        self.span.set_attributes({"gen_ai.usage.input_tokens": self.prompt_tokens,
                                  "gen_ai.usage.output_tokens": self.output_tokens,
                                  "gen_ai.response.finish_reasons": self.finish_reasons,
                                  "rpc.grpc.status": status})
