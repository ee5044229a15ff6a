"""What the HTTP (SSE) path adds to each streamed token, against gRPC, in one run.

Per token: the wall-clock gap between the scheduler emitting its delta (the
`emitted_unix_s` stamp each delta carries, scheduler -> router -> client) and
the client reading it. Half the `--streams` are gRPC `Generate` calls and half
SSE `/v1/completions` requests, all through the same Envoy port, started
together with the same greedy workload, so both see the same steps. The
executor runs the benchmark-only SleepModel (`--step-ms` per forward, no CPU):
on this 2-core box a real forward would fight the transport for the cores and
blur what is measured. Per path: percentiles over every token of every round,
and the tokens that took over 40 ms (a Nagle / delayed-ACK stall).
"""
from __future__ import annotations

import asyncio
import json

from llmesh.benchmarks import kit

PROMPT = [1, 17, 29, 31, 37]
STALL_S = 0.040


async def _sse_stream(host: str, port: int, i: int, max_tokens: int) -> list[float]:
    """A plain HTTP/1.1 client (asyncio sockets set TCP_NODELAY): one `data:` line
    per event, timed as it is read."""
    import time
    body = json.dumps({"model": "default", "prompt": PROMPT + [40 + i], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_timing": True}}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: llmesh\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    gaps = []
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 300)
            if not line or line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: "):
                now = time.time()
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream failed: {event['error']}")
                if event["choices"] and event["choices"][0]["text"] is not None:
                    gaps.append(now - event["emitted_unix_s"])
    finally:
        writer.close()
    return gaps


async def _round(endpoint: str, streams: int, max_tokens: int) -> tuple[list, list]:
    host, port = endpoint.rsplit(":", 1)
    half = streams // 2
    grpc_load = kit.load(endpoint, lambda i: kit.request(PROMPT + [40 + i], max_tokens),
                         count=half)
    answers, *sse = await asyncio.gather(grpc_load, *(
        _sse_stream(host, int(port), i, max_tokens) for i in range(half, streams)))
    return [g for a in answers for g in a["emitted_delays_s"]], [g for r in sse for g in r]


def _summary(gaps: list[float]) -> dict:
    return {**kit.percentiles(gaps), "over_40ms": sum(g > STALL_S for g in gaps)}


def options(p) -> None:
    p.add_argument("--streams", type=int, default=32, help="half gRPC, half SSE")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)


def run(args) -> dict:
    grpc_gaps, sse_gaps = [], []
    with kit.BenchMesh(args.model, engine={
            "num_kv_blocks": 1024, "max_num_seqs": max(64, args.streams),
            "bench_step_ms": args.step_ms, "probe_interval_s": 0.0}) as mesh:
        asyncio.run(_round(mesh.endpoint, 4, 4))  # warm up connections and both paths
        for r in range(args.rounds):
            g, s = asyncio.run(_round(mesh.endpoint, args.streams, args.max_tokens))
            grpc_gaps += g
            sse_gaps += s
            kit.log(f"round {r + 1}: grpc p50 {_summary(g)['p50']:.2f} ms, "
                    f"sse p50 {_summary(s)['p50']:.2f} ms")
    out = {"grpc": _summary(grpc_gaps), "sse": _summary(sse_gaps)}
    out["sse_minus_grpc_ms"] = {k: out["sse"][k] - out["grpc"][k] for k in ("p50", "p90", "p99")}
    return out


SPEC = kit.Spec("stream_latency", __doc__, options, run)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
