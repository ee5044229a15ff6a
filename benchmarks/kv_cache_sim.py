"""The KV-routing benchmark's workload replayed over the replicas' real KV managers,
without a mesh: how much of the prefix hit rate is placement and how much eviction.

Requests arrive one at a time (`llmesh.benchmarks.kv_routing.workload`, the same seed);
each replica keeps `--in-flight` requests holding their blocks (the benchmark's 8
clients over 4 replicas), and a request's blocks are freed when the replica takes
its `--in-flight`-th next one. Placements:

- round_robin: request i on replica i mod N;
- kv_aware: the replica holding the longest cached prefix of the prompt, else the
  least busy (the router's rule without its load bound: loads here stay equal);
- partition: the prompt's system prompt g on replica g mod N, the fixed split a
  router with perfect knowledge of the groups could make.

The hit rate is cached prompt tokens / prompt tokens, as the mesh's usage reports it.
"""
from __future__ import annotations

import random

from llmesh.benchmarks import kit
from llmesh.benchmarks.kv_routing import workload

PLACEMENTS = ("round_robin", "kv_aware", "partition")
OUTPUT_TOKENS = 16


def replay(placement: str, prompts: list[list[int]], prefix_tokens: int, replicas: int,
           kv_blocks: int, in_flight: int, block_size: int = 16, seed: int = 5) -> float:
    from llmesh.services.scheduler.kv_manager import KVCacheManager
    rng = random.Random(seed)
    kvs = [KVCacheManager(kv_blocks, block_size) for _ in range(replicas)]
    running: list[list[str]] = [[] for _ in range(replicas)]
    groups: dict[tuple, int] = {}
    hit = total = 0
    for i, prompt in enumerate(prompts):
        group = groups.setdefault(tuple(prompt[:prefix_tokens]), len(groups))
        if placement == "round_robin":
            r = i % replicas
        elif placement == "partition":
            r = group % replicas
        else:
            held = [len(kv.find_cached_prefix(prompt)) for kv in kvs]
            r = max(range(replicas), key=lambda k: (held[k], -len(running[k])))
            if not held[r]:
                r = min(range(replicas), key=lambda k: (len(running[k]), rng.random()))
        kv, seq = kvs[r], f"s{i}"
        if len(running[r]) >= in_flight:
            kv.free(running[r].pop(0))
        cached = kv.find_cached_prefix(prompt)
        num_hit = len(cached) * block_size
        while kv.allocate_slots(seq, len(prompt), num_hit, cached) is None:
            kv.free(running[r].pop(0))  # (never the case at these sizes)
        hit, total = hit + num_hit, total + len(prompt)
        kv.cache_blocks(seq, prompt, len(prompt), len(prompt) - num_hit)
        tokens = prompt + [rng.randrange(5, 3000) for _ in range(OUTPUT_TOKENS)]
        kv.allocate_slots(seq, len(tokens), len(prompt))
        # the last sampled token is never fed back: its KV is not computed
        kv.cache_blocks(seq, tokens, len(tokens) - 1, len(tokens) - 1 - len(prompt))
        running[r].append(seq)
    return hit / total


def options(p) -> None:
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=128)
    p.add_argument("--kv-blocks", default="48,64,80,96,128",
                   help="KV blocks per replica: one row of the table each")
    p.add_argument("--in-flight", type=int, default=2)


def run(args) -> dict:
    prompts = workload(args.requests, args.groups, args.prefix_tokens)
    rows = []
    for blocks in (int(b) for b in args.kv_blocks.split(",")):
        rates = {name: replay(name, prompts, args.prefix_tokens, args.replicas, blocks,
                              args.in_flight) for name in PLACEMENTS}
        rows.append({"kv_blocks": blocks, "prefix_hit_rate": rates,
                     "kv_aware_over_round_robin": rates["kv_aware"] / rates["round_robin"],
                     "partition_over_round_robin": rates["partition"] / rates["round_robin"]})
    return {"rows": rows}


def table(report: dict) -> str:
    return kit.md_table(
        ["KV blocks per replica", "round_robin", "kv_aware", "fixed split",
         "kv_aware / round_robin"],
        [[r["kv_blocks"], *(f"{r['prefix_hit_rate'][p]:.3f}" for p in PLACEMENTS),
          f"{r['kv_aware_over_round_robin']:.2f}"] for r in report["rows"]])


SPEC = kit.Spec("kv_cache_sim", __doc__, options, run, model=None, table=table)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
