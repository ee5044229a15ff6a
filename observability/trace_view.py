"""`llmesh trace`: one request's trace from the local span file, as a terminal waterfall."""
from __future__ import annotations

import json
import time
from pathlib import Path

KEY_ATTRS = ("llmesh.request_id", "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens",
             "gen_ai.usage.output_tokens", "gen_ai.response.finish_reasons", "llmesh.replica",
             "llmesh.step_id", "llmesh.step.num_seqs", "llmesh.step.num_tokens",
             "llmesh.chunk.tokens", "llmesh.rank", "rpc.method", "rpc.grpc.status_code",
             "rpc.grpc.status")
JSON_FIELDS = ("trace_id", "span_id", "parent_span_id", "service", "name", "start_ns", "end_ns",
               "attributes", "events", "links", "status")


def load_spans(path: Path) -> list[dict]:
    spans = []
    if not path.exists():
        return spans
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    spans.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    return spans


def settle(path: Path, spans: list[dict], trace_id: str, settle_s: float) -> list[dict]:
    """Services export finished spans every few seconds, so a trace whose newest
    span ended less than `settle_s` ago may still be missing some: wait out the
    rest of that window once and read the file again."""
    newest = max((s["end_ns"] for s in spans if s["trace_id"] == trace_id), default=0)
    wait = settle_s - (time.time_ns() - newest) / 1e9
    if wait <= 0:
        return spans
    time.sleep(min(wait, settle_s))
    return load_spans(path)


def find_trace(spans: list[dict], request_id: str | None) -> str | None:
    """The trace id of `request_id`, or of the latest request when None."""
    tagged = [s for s in spans if s.get("attributes", {}).get("llmesh.request_id")]
    if request_id is not None:
        tagged = [s for s in tagged if s["attributes"]["llmesh.request_id"] == request_id]
    if not tagged:
        return None
    return max(tagged, key=lambda s: s["start_ns"])["trace_id"]


def trace_spans(spans: list[dict], trace_id: str) -> list[dict]:
    return sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start_ns"])


def _tree_order(spans: list[dict]) -> list[tuple[int, dict]]:
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict]] = {}
    roots = []
    for s in spans:
        if s["parent_span_id"] and s["parent_span_id"] in ids:
            children.setdefault(s["parent_span_id"], []).append(s)
        else:
            roots.append(s)
    out = []

    def walk(span, depth):
        out.append((depth, span))
        for child in sorted(children.get(span["span_id"], []), key=lambda c: c["start_ns"]):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda r: r["start_ns"]):
        walk(root, 0)
    return out


def render(spans: list[dict], width: int = 32) -> str:
    if not spans:
        return "(no spans)"
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    lines = [f"trace {spans[0]['trace_id']}  {len(spans)} spans  {total / 1e6:.2f} ms",
             f"{'service':<16} {'span':<44} {'start ms':>9} {'dur ms':>9}  timeline"]
    for depth, s in _tree_order(spans):
        start = (s["start_ns"] - t0) / 1e6
        dur = (s["end_ns"] - s["start_ns"]) / 1e6
        a = int((s["start_ns"] - t0) / total * width)
        b = max(a + 1, int((s["end_ns"] - t0) / total * width))
        bar = " " * a + "#" * (b - a) + " " * (width - b)
        attrs = " ".join(f"{k.split('.')[-1]}={_short(s['attributes'][k])}" for k in KEY_ATTRS
                         if k in s.get("attributes", {}))
        events = ",".join(e["name"] for e in s.get("events", []))
        name = ("  " * depth + s["name"])[:44]
        lines.append(f"{s['service'][:16]:<16} {name:<44} {start:>9.2f} {dur:>9.2f}  |{bar}| "
                     f"{attrs}{'  events=' + events if events else ''}")
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def as_json(spans: list[dict]) -> str:
    return json.dumps([{k: s.get(k) for k in JSON_FIELDS} for s in spans], indent=1)
