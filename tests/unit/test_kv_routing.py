"""The router's KV-aware, load-aware replica choice (services/router/core.py)."""
import random

from llmesh.services.router.core import ReplicaChooser, ReplicaLoad, RoutingPolicy


def _replicas(loads, cached=(), kv=()):
    cached = dict(cached)
    kv = dict(kv)
    return [ReplicaLoad(name, True, 0, queued=float(load), cached_tokens=cached.get(name, 0),
                        kv_usage=kv.get(name, 0.0)) for name, load in loads.items()]


def test_a_shared_prefix_stays_on_its_replica_until_the_load_bound_then_spreads():
    chooser = ReplicaChooser(RoutingPolicy(prefix_load_bound=4, prefix_load_ratio=1.5))
    loads = {"a": 0, "b": 0, "c": 0}
    holders = {"a"}  # a replica holds the prefix once it served it
    picks = []
    for _ in range(30):  # arrivals faster than completions
        name = chooser.pick(_replicas(loads, {h: 64 for h in holders}))
        picks.append(name)
        loads[name] += 1
        holders.add(name)
        assert max(loads.values()) - min(loads.values()) <= 4 + 1
    assert picks[:5] == ["a"] * 5  # up to the bound: the replica holding the prefix
    assert picks[5] in ("b", "c")  # then the least loaded, which then holds it too
    assert set(picks) == {"a", "b", "c"}


def test_no_replica_is_ever_chosen_past_the_bound():
    rng = random.Random(7)
    policy = RoutingPolicy(prefix_load_bound=3, prefix_load_ratio=1.25)
    chooser = ReplicaChooser(policy)
    loads = {f"r{i}": 0 for i in range(4)}
    held = {f"r{i}": set() for i in range(4)}
    for _ in range(2000):
        if rng.random() < 0.45:  # a request finishes somewhere
            busy = [n for n, v in loads.items() if v]
            if busy:
                loads[rng.choice(busy)] -= 1
            continue
        prefix = rng.choice(["p0", "p0", "p0", "p1", "p2"])  # one hot prefix
        reps = _replicas(loads, {n: 48 for n in loads if prefix in held[n]})
        name = chooser.pick(reps)
        least = min(loads.values())
        assert loads[name] <= least + max(3, 0.25 * least)
        loads[name] += 1
        held[name].add(prefix)


def test_more_cached_tokens_win_among_replicas_within_the_bound():
    chooser = ReplicaChooser()
    reps = _replicas({"a": 2, "b": 3, "c": 1}, {"a": 32, "b": 64})
    assert chooser.pick(reps) == "b"
    # nothing cached anywhere: the least loaded
    assert chooser.pick(_replicas({"a": 2, "b": 3, "c": 1})) == "c"


def test_a_full_kv_cache_is_avoided_while_another_has_room():
    chooser = ReplicaChooser()
    reps = _replicas({"a": 0, "b": 1}, {"a": 64}, kv={"a": 0.97})
    assert chooser.pick(reps) == "b"
    reps = _replicas({"a": 0, "b": 1}, {"a": 64}, kv={"a": 0.97, "b": 0.99})
    assert chooser.pick(reps) == "a"  # all full: the prefix still counts


def test_not_ready_replicas_get_nothing_and_the_baselines_ignore_prefixes():
    reps = _replicas({"a": 0, "b": 5}, {"b": 64})
    reps[0].is_ready = False
    assert ReplicaChooser().pick(reps) == "b"
    reps[1].is_ready = False
    assert ReplicaChooser().pick(reps) is None
    least = ReplicaChooser(RoutingPolicy(policy="least_loaded"))
    assert least.pick(_replicas({"a": 1, "b": 0}, {"a": 64})) == "b"
    rr = ReplicaChooser(RoutingPolicy(policy="round_robin"))
    assert [rr.pick(_replicas({"a": 9, "b": 0, "c": 0})) for _ in range(4)] == ["a", "b", "c", "a"]


def test_without_a_load_report_the_routers_own_in_flight_counts():
    reps = [ReplicaLoad("a", True, 3), ReplicaLoad("b", True, 1)]
    assert ReplicaChooser().pick(reps) == "b"
