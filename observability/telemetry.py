"""Tracing, metrics and logs for one service process, configured from the
environment the supervisor sets:

    LLMESH_TRACING         off | otlp        (default off)
    LLMESH_OTLP_ENDPOINT   host:port of an OTLP/gRPC trace collector
    LLMESH_TRACE_SAMPLE    parent-based ratio of new traces sampled (default 1.0)
    LLMESH_DECODE_STEP_EVERY  decode-only engine steps get a span every N steps (default 1)
    LLMESH_TRACE_EXPORT_MS how often finished spans are sent to the collector (default 2000)
    LLMESH_METRICS_PORT    Prometheus /metrics on PORT (unset: none), on 127.0.0.1 or
                           LLMESH_BIND_HOST (services/common/server.py)

With tracing off the OpenTelemetry API is the no-op one and no interceptor is
installed, so the hot path pays nothing. With it on, W3C trace context travels
in gRPC metadata (opentelemetry-instrumentation-grpc interceptors) on unary
calls, and in a `traceparent` field on the long-lived streams (router ->
scheduler Connect, scheduler -> executor Run), whose messages each belong to a
different request or step.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_state = {"tracing": False, "service": "llmesh"}

# Only the router and tokenizer have interceptors (Service(traced=True)); every
# method they serve belongs to one request.
EXPORT_INTERVAL_MS = 2000  # default LLMESH_TRACE_EXPORT_MS; Envoy's tracer flushes as often
EXPORT_MAX_QUEUE = 16384  # spans a process may hold between exports before dropping


def tracing_enabled() -> bool:
    return _state["tracing"]


def init(service: str) -> None:
    """Set up logs, tracing and metrics for this process (call once, first thing)."""
    _state["service"] = service
    setup_logging(service)
    if os.environ.get("LLMESH_TRACING", "off") == "otlp":
        _setup_tracing(service)
    port = os.environ.get("LLMESH_METRICS_PORT")
    if port:
        from prometheus_client import start_http_server

        from llmesh.services.common.net import bind_host
        start_http_server(int(port), addr=bind_host())


def _setup_tracing(service: str) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    endpoint = os.environ.get("LLMESH_OTLP_ENDPOINT", "127.0.0.1:4317")
    ratio = float(os.environ.get("LLMESH_TRACE_SAMPLE", "1.0"))
    provider = TracerProvider(resource=Resource.create({"service.name": service}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    # fewer, larger exports: each one is an RPC on both ends, whatever its size
    delay_ms = int(os.environ.get("LLMESH_TRACE_EXPORT_MS", str(EXPORT_INTERVAL_MS)))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=2),
        schedule_delay_millis=delay_ms, max_queue_size=EXPORT_MAX_QUEUE, max_export_batch_size=1024))
    trace.set_tracer_provider(provider)
    _state["tracing"] = True


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()  # flushes what is queued


def tracer(name: str = "llmesh") -> trace.Tracer:
    return trace.get_tracer(name)


def _rpc_filter(untraced_methods: tuple[str, ...] = ()):
    from opentelemetry.instrumentation.grpc import filters
    return filters.negate(filters.any_of(
        filters.health_check(), filters.service_prefix("grpc.reflection"),
        *(filters.method_name(m) for m in untraced_methods)))


def server_interceptors(untraced_methods: tuple[str, ...] = ()) -> list:
    """`untraced_methods`: long-lived streams that would be one span for the life of
    the process (the kvcache index's Publish)."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor(filter_=_rpc_filter(untraced_methods))]


def client_interceptors() -> list:
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return aio_client_interceptors(filter_=_rpc_filter())


def inject(ctx=None) -> str:
    """The W3C `traceparent` of the current (or given) context; "" when none."""
    if not tracing_enabled():
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier.get("traceparent", "")


def extract(traceparent: str):
    """A context whose parent is `traceparent` (an empty context for "")."""
    if not traceparent:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


def now_ns() -> int:
    return time.time_ns()


# --- logs -------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, and the
    current trace id and request id when there are any."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname,
               "service": self.service, "logger": record.name, "msg": record.getMessage()}
        span_ctx = trace.get_current_span().get_span_context()
        if span_ctx.is_valid:
            out["trace_id"] = format(span_ctx.trace_id, "032x")
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
