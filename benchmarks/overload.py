"""Overload far past capacity: what admission lets in, and how long those wait.

    python -m llmesh.benchmarks.overload [--rate 150] [--duration 6] [--priority interactive]
                                  [--max-tokens 24] [--json OUT]

An open-loop flood of gRPC `Generate` requests through Envoy into one tiny
replica (a mesh this script brings up). Every answer should be OK or
RESOURCE_EXHAUSTED with a retry hint, and the admitted requests' TTFT should
stay within their class's budget (interactive 2 s, standard 15 s): that is
what SLO-aware admission promises. Reports statuses, the share refused, and
the admitted requests' TTFT p50 / p99 against the budget.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

from llmesh.benchmarks.local_mesh import local_mesh, write_report

PRIORITIES = {"interactive": 1, "standard": 2, "batch": 3}


async def _one(stub, i: int, priority: int, max_tokens: int):
    import grpc

    from llmesh.v1 import common_pb2, inference_pb2
    req = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[0] + [(13 * i + 7 * j) % 2900 + 5
                                                    for j in range(40)]),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        priority=priority)
    t0 = time.monotonic()
    ttft = None
    try:
        async for resp in stub.Generate(req, timeout=300):
            if ttft is None and resp.token_ids:
                ttft = time.monotonic() - t0
        return "OK", ttft, False
    except grpc.aio.AioRpcError as e:
        hint = any(k == "retry-after-ms" for k, _ in (e.trailing_metadata() or ()))
        return e.code().name, None, hint


async def flood(endpoint: str, rate: float, duration_s: float, priority: int,
                 max_tokens: int) -> list:
    import grpc

    from llmesh.v1 import inference_pb2_grpc
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        tasks, start = [], time.monotonic()
        for i in range(int(rate * duration_s)):  # bounded in count and time
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(stub, i, priority, max_tokens)))
        return await asyncio.wait_for(asyncio.gather(*tasks), 600)


def main(argv=None) -> int:
    from llmesh.mesh.default_model import make_tiny
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.overload")
    p.add_argument("--rate", type=float, default=150.0)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--priority", choices=list(PRIORITIES), default="interactive")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--json")
    args = p.parse_args(argv)
    model_dir = str(make_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    with local_mesh(model_dir, num_kv_blocks=256) as endpoint:
        results = asyncio.run(flood(endpoint, args.rate, args.duration,
                                     PRIORITIES[args.priority], args.max_tokens))
    admitted = sorted(t for s, t, _ in results if s == "OK" and t is not None)
    refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]

    def q(p: float):
        return round(admitted[min(len(admitted) - 1, int(p * len(admitted)))], 3) \
            if admitted else None
    write_report(args, {
        "statuses": dict(collections.Counter(s for s, _, _ in results)),
        "refused_share": round(len(refused) / len(results), 3),
        "refusals_with_retry_hint": sum(h for _, _, h in refused),
        "admitted_ttft_s": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}})
    return 0

if __name__ == "__main__":
    sys.exit(main())
