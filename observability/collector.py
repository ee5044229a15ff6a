"""The mesh's local trace collector: an OTLP/gRPC TraceService on loopback that
appends every span it receives, as one JSON object per line, to a file.

    python -m llmesh.observability.collector --port P --out RUN_DIR/traces.jsonl

With `observability.tracing: file` (the default) every service and Envoy export
here, and `llmesh trace` reads the file. Each line has trace_id, span_id,
parent_span_id (hex; "" for a root), service, name, kind, start_ns, end_ns,
attributes, events, links and status.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from llmesh.observability import telemetry
from llmesh.services.common.server import Service


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def span_records(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in request.resource_spans:
        service = _attrs(rs.resource.attributes).get("service.name", "unknown")
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append({
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(), "service": service,
                    "name": span.name, "kind": span.kind,
                    "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                    "attributes": _attrs(span.attributes),
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano,
                                "attributes": _attrs(e.attributes)} for e in span.events],
                    "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex()}
                              for ln in span.links],
                    "status": span.status.code,
                })
    return out


class FileCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    async def Export(self, request, context):
        records = span_records(request)
        if records:
            self.file.write("".join(json.dumps(r) + "\n" for r in records))
        return trace_service_pb2.ExportTraceServiceResponse()


async def main(args) -> None:
    service = Service("collector", args.port, max_message_bytes=64 * 2**20)
    service.add(trace_service_pb2_grpc.add_TraceServiceServicer_to_server,
                FileCollector(Path(args.out)), "opentelemetry.proto.collector.trace.v1.TraceService")
    await service.start()
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="llmesh.observability.collector")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    telemetry.setup_logging("collector")
    asyncio.run(main(args))
