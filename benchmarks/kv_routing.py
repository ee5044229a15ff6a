"""KV-aware routing against least-loaded and round-robin, on a shared-prefix workload.

Each policy gets its own mesh of `--replicas` replicas of the tiny model (one
router), and the same requests in the same order: `--groups` system prompts of
`--prefix-tokens` tokens each, every request one of them (Zipf-like: the first
groups are the most used) plus a 16-token question of its own, 16 output tokens.
Each replica's KV (`--kv-blocks` blocks of 16 tokens) holds only part of the
prefixes, so where a prefix's requests go decides how often they hit. Requests
are sent by `--concurrency` closed-loop clients (or Poisson at `--rate` per
second). The report gives, per policy, the prefix hit rate (cached prompt tokens
/ prompt tokens, as the replicas report them in usage), TTFT percentiles and
throughput.
"""
from __future__ import annotations

import asyncio
import random

from llmesh.benchmarks import kit
from llmesh.services.router.core import POLICIES


def workload(num: int, groups: int, prefix_tokens: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[0] + rng.choices(range(5, 3000), k=prefix_tokens - 1) for _ in range(groups)]
    weights = [1 / (g + 1) for g in range(groups)]
    return [rng.choices(prefixes, weights)[0] + rng.choices(range(5, 3000), k=16)
            for _ in range(num)]


def measure(endpoint: str, prompts: list[list[int]], concurrency: int, rate: float) -> dict:
    asyncio.run(kit.load(endpoint, lambda i: kit.request(prompts[i][-17:], 16), count=8,
                         concurrency=8))  # warm every path once (not counted)
    answers = asyncio.run(kit.load(endpoint, lambda i: kit.request(prompts[i], 16),
                                   count=len(prompts), rate=rate or None, seed=2,
                                   concurrency=None if rate else concurrency, timeout_s=120))
    return {"requests": len(answers),
            "prefix_hit_rate": sum(a["usage"].cached_prompt_tokens for a in answers)
            / sum(a["usage"].prompt_tokens for a in answers),
            "ttft": kit.percentiles([a["ttft_s"] for a in answers]),
            "requests_per_s": len(answers) / kit.wall_s(answers)}


def options(p) -> None:
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=128)
    p.add_argument("--kv-blocks", type=int, default=64, help="per replica")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0,
                   help="Poisson arrivals per second (0: closed loop)")
    p.add_argument("--policies", default=",".join(POLICIES))


def run(args) -> dict:
    prompts = workload(args.requests, args.groups, args.prefix_tokens)
    results = {}
    for policy in args.policies.split(","):
        with kit.BenchMesh(args.model, replicas=args.replicas, routing={"policy": policy},
                           engine={"num_kv_blocks": args.kv_blocks, "max_num_seqs": 16,
                                   "probe_interval_s": 0}) as mesh:
            results[policy] = measure(mesh.endpoint, prompts, args.concurrency, args.rate)
        kit.log(f"[kv_routing] {policy}: {results[policy]}")
    rr = results.get("round_robin", {}).get("prefix_hit_rate")
    kv = results.get("kv_aware", {}).get("prefix_hit_rate")
    return {"policies": results,
            "hit_rate_kv_aware_over_round_robin": kv / rr if kv and rr else None}


SPEC = kit.Spec("kv_routing", __doc__, options, run)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
