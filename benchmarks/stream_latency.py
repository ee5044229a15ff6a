"""What the HTTP (SSE) path adds to each streamed token, against gRPC, in one run.

    python -m llmesh.benchmarks.stream_latency [--streams 32] [--max-tokens 64] [--step-ms 20]
                                        [--rounds 3] [--json OUT]

Per token: the wall-clock gap between the scheduler emitting its delta (the
`emitted_unix_s` stamp each delta carries, scheduler -> router -> client) and
the client reading it. Half the streams are gRPC `Generate` calls and half are
SSE `/v1/completions` requests, all through the same Envoy port, started
together with the same greedy workload, so both see the same steps. The
executor runs the benchmark-only SleepModel (`--step-ms` per forward, no CPU):
on this 2-core box a real forward would fight the transport for the cores and
blur what is measured. Per path: p50 / p90 / p99 / max over every token of
every round, and the tokens that took over 40 ms (a Nagle / delayed-ACK stall).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmesh.benchmarks.local_mesh import local_mesh, write_report

PROMPT = [1, 17, 29, 31, 37]
STALL_S = 0.040


async def _grpc_stream(channel, i: int, max_tokens: int) -> list[float]:
    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    stub = inference_pb2_grpc.InferenceStub(channel)
    req = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=PROMPT + [40 + i]),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    gaps = []
    async for resp in stub.Generate(req, timeout=300):
        now = time.time()
        if resp.token_ids:
            gaps.append(now - resp.emitted_unix_s)
    return gaps


async def _sse_stream(host: str, port: int, i: int, max_tokens: int) -> list[float]:
    """A plain HTTP/1.1 client (asyncio sockets set TCP_NODELAY): one `data:` line
    per event, timed as it is read."""
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
    import grpc
    host, port = endpoint.rsplit(":", 1)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        grpc_tasks = [_grpc_stream(channel, i, max_tokens) for i in range(streams // 2)]
        sse_tasks = [_sse_stream(host, int(port), i, max_tokens)
                     for i in range(streams // 2, streams)]
        results = await asyncio.gather(*grpc_tasks, *sse_tasks)
    half = streams // 2
    return ([g for r in results[:half] for g in r], [g for r in results[half:] for g in r])


def _summary(gaps: list[float]) -> dict:
    ms = sorted(g * 1000 for g in gaps)

    def q(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 3)
    return {"tokens": len(ms), "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99),
            "max_ms": round(ms[-1], 3), "mean_ms": round(statistics.fmean(ms), 3),
            "over_40ms": sum(m > STALL_S * 1000 for m in ms)}


def run(model_dir: str, streams: int, max_tokens: int, step_ms: float, rounds: int) -> dict:
    grpc_gaps, sse_gaps = [], []
    with local_mesh(model_dir, num_kv_blocks=1024, max_num_seqs=max(64, streams),
                    bench_step_ms=step_ms, probe_interval_s=0.0) as endpoint:
        asyncio.run(_round(endpoint, 4, 4))  # warm up connections and both paths
        for r in range(rounds):
            g, s = asyncio.run(_round(endpoint, streams, max_tokens))
            grpc_gaps += g
            sse_gaps += s
            print(f"round {r + 1}: grpc p50 {_summary(g)['p50_ms']} ms, "
                  f"sse p50 {_summary(s)['p50_ms']} ms", file=sys.stderr)
    out = {"grpc": _summary(grpc_gaps), "sse": _summary(sse_gaps)}
    out["sse_minus_grpc_ms"] = {k: round(out["sse"][k] - out["grpc"][k], 3)
                                for k in ("p50_ms", "p90_ms", "p99_ms")}
    return out


def main(argv=None) -> int:
    from llmesh.mesh.default_model import make_tiny
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.stream_latency")
    p.add_argument("--model", help="model directory (default: the tiny model)")
    p.add_argument("--streams", type=int, default=32, help="half gRPC, half SSE")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    model_dir = args.model or str(make_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    write_report(args, run(model_dir, args.streams, args.max_tokens, args.step_ms, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
