"""KV-aware routing against least-loaded and round-robin, on a shared-prefix workload.

    python -m llmesh.benchmarks.kv_routing [--model DIR] [--replicas 4] [--requests 600]
        [--groups 32] [--prefix-tokens 128] [--kv-blocks 64] [--rate 0] [--json OUT]

Each policy gets its own mesh of `--replicas` replicas of the tiny model (one
router), and the same requests in the same order: `--groups` system prompts of
`--prefix-tokens` tokens each, every request one of them (Zipf-like: the first
groups are the most used) plus a 16-token question of its own, 16 output tokens.
Each replica's KV (`--kv-blocks` blocks of 16 tokens) holds only part of the
prefixes, so where a prefix's requests go decides how often they hit. Requests
are sent by 8 closed-loop clients (or Poisson at `--rate` per second). The report
gives, per policy, the prefix hit rate (cached prompt tokens / prompt tokens, as
the replicas report them in usage), p50/p99 TTFT and throughput.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from llmesh.benchmarks.chaos import _percentiles
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from llmesh.services.router.core import POLICIES


def workload(num: int, groups: int, prefix_tokens: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[0] + rng.choices(range(5, 3000), k=prefix_tokens - 1) for _ in range(groups)]
    weights = [1 / (g + 1) for g in range(groups)]
    return [rng.choices(prefixes, weights)[0] + rng.choices(range(5, 3000), k=16)
            for _ in range(num)]


def run(endpoint: str, prompts: list[list[int]], concurrency: int, rate: float) -> dict:
    channel = grpc.insecure_channel(endpoint)
    stub = inference_pb2_grpc.InferenceStub(channel)

    def call(prompt: list[int]) -> dict:
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompt),
            sampling=common_pb2.SamplingParams(max_tokens=16, ignore_eos=True))
        t0 = time.monotonic()
        ttft, usage = None, None
        for chunk in stub.Generate(req, timeout=120):
            if ttft is None and chunk.token_ids:
                ttft = time.monotonic() - t0
            if chunk.finish_reason:
                usage = chunk.usage
        return {"ttft_s": ttft, "prompt": usage.prompt_tokens, "cached": usage.cached_prompt_tokens}

    for p in prompts[:8]:  # warm every path once (not counted)
        call(p[-17:])
    t0 = time.monotonic()
    if rate:
        rng = random.Random(2)
        with ThreadPoolExecutor(128) as pool:
            futures, t = [], t0
            for p in prompts:
                t += rng.expovariate(rate)
                time.sleep(max(0.0, t - time.monotonic()))
                futures.append(pool.submit(call, p))
            records = [f.result() for f in futures]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            records = list(pool.map(call, prompts))
    elapsed = time.monotonic() - t0
    channel.close()
    return {"requests": len(records),
            "prefix_hit_rate": sum(r["cached"] for r in records) / sum(r["prompt"] for r in records),
            "ttft": _percentiles([r["ttft_s"] for r in records]),
            "requests_per_s": len(records) / elapsed}


def main(argv=None) -> int:
    from llmesh.benchmarks.local_mesh import supervised_mesh, write_report
    from llmesh.mesh.config import RoutingConfig
    from llmesh.mesh.default_model import default_model_dir
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.kv_routing")
    p.add_argument("--model", help="model directory (default: the tiny preset)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=128)
    p.add_argument("--kv-blocks", type=int, default=64, help="per replica")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: "
                   "closed loop)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--json")
    args = p.parse_args(argv)
    model_dir = args.model or str(default_model_dir("tiny"))
    prompts = workload(args.requests, args.groups, args.prefix_tokens)
    results = {}
    for policy in args.policies.split(","):
        topology = {"replicas": args.replicas, "routing": RoutingConfig(policy=policy)}
        with supervised_mesh(model_dir, topology, num_kv_blocks=args.kv_blocks,
                             max_num_seqs=16, probe_interval_s=0) as (endpoint, _):
            results[policy] = run(endpoint, prompts, args.concurrency, args.rate)
        print(f"[kv_routing] {policy}: {results[policy]}", file=sys.stderr)
    rr = results.get("round_robin", {}).get("prefix_hit_rate")
    kv = results.get("kv_aware", {}).get("prefix_hit_rate")
    write_report(args, {"model": model_dir, "policies": results,
                        "hit_rate_kv_aware_over_round_robin": kv / rr if kv and rr else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
