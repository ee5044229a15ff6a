"""benchmarks/kv_cache_sim: with room for every prefix, each placement misses exactly
the first request of a system prompt on each replica that gets it; under pressure
the placements that keep a prompt on one replica hit more than round-robin."""
from llmesh.benchmarks.kv_cache_sim import PLACEMENTS, replay
from llmesh.benchmarks.kv_routing import workload


def _cold_rate(prompts, replica_of) -> float:
    seen, hit = set(), 0
    for i, p in enumerate(prompts):
        key = (tuple(p[:128]), replica_of(i, p))
        hit += 128 if key in seen else 0  # the 8 full prefix blocks (the question is the 9th)
        seen.add(key)
    return hit / sum(len(p) for p in prompts)


def test_with_room_for_every_prefix_only_first_visits_miss():
    prompts = workload(200, 12, 128)
    groups = {}
    for p in prompts:
        groups.setdefault(tuple(p[:128]), len(groups))
    rates = {name: replay(name, prompts, 128, replicas=4, kv_blocks=4096, in_flight=2)
             for name in PLACEMENTS}
    assert rates["round_robin"] == _cold_rate(prompts, lambda i, p: i % 4)
    assert rates["partition"] == _cold_rate(prompts, lambda i, p: groups[tuple(p[:128])] % 4)
    assert rates["kv_aware"] == _cold_rate(prompts, lambda i, p: 0)  # (one visit per prompt)


def test_under_pressure_keeping_a_prompt_on_one_replica_hits_more():
    prompts = workload(300, 32, 128)
    rates = {name: replay(name, prompts, 128, replicas=4, kv_blocks=64, in_flight=2)
             for name in PLACEMENTS}
    assert rates["kv_aware"] > 1.5 * rates["round_robin"]
    assert rates["partition"] > 1.5 * rates["round_robin"]
