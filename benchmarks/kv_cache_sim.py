"""The KV-routing benchmark's workload replayed over the replicas' real KV managers,
without a mesh: how much of the prefix hit rate is placement and how much eviction.

    python -m llmesh.benchmarks.kv_cache_sim [--replicas 4] [--requests 600] [--groups 32]
        [--prefix-tokens 128] [--kv-blocks 64] [--in-flight 2] [--json OUT]

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

import argparse
import json
import random

from llmesh.benchmarks.kv_routing import workload
from llmesh.services.scheduler.kv_manager import KVCacheManager

PLACEMENTS = ("round_robin", "kv_aware", "partition")
OUTPUT_TOKENS = 16


def replay(placement: str, prompts: list[list[int]], prefix_tokens: int, replicas: int,
           kv_blocks: int, in_flight: int, block_size: int = 16, seed: int = 5) -> float:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmesh.benchmarks.kv_cache_sim")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=128)
    p.add_argument("--kv-blocks", type=int, default=64)
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    prompts = workload(args.requests, args.groups, args.prefix_tokens)
    rates = {name: replay(name, prompts, args.prefix_tokens, args.replicas, args.kv_blocks,
                          args.in_flight) for name in PLACEMENTS}
    out = {"args": vars(args), "prefix_hit_rate": rates,
           "kv_aware_over_round_robin": rates["kv_aware"] / rates["round_robin"],
           "partition_over_round_robin": rates["partition"] / rates["round_robin"]}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
