"""Router core, free of grpc: replica choice.

The rule (`routing.policy: kv_aware`, the default):
1. Only replicas that take requests count: connected, SERVING, not draining,
   breaker closed (warm standbys only while a regular replica is not).
2. A replica's load is its queue as its scheduler last reported it (running +
   waiting, every router's requests), or the requests this router has in flight
   there, if more: a report can predate requests still on their way to it.
3. The least load L sets a bound: a replica may take the request for its
   prefix only if its load is at most L + max(`prefix_load_bound`,
   (`prefix_load_ratio` - 1) x L). A prefix never pulls a request onto a
   replica further ahead than that, so one hot prefix cannot pile its traffic
   onto one replica: once that replica is the bound ahead, the next request
   goes to the least loaded one, which then holds the prefix too.
4. A replica whose KV is `kv_full` (95%) used is left out while another is not.
5. Among what remains, the most prompt tokens cached (from the kvcache index,
   under the tenant's salt) wins; ties, and requests no replica has cached,
   go to the least loaded.

`least_loaded` skips 3-5 (least load only); `round_robin` cycles through the
replicas that take requests. Both exist to be measured against.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

POLICIES = ("kv_aware", "least_loaded", "round_robin")


@dataclass
class ReplicaLoad:
    name: str
    is_ready: bool
    num_in_flight: int
    is_standby: bool = False
    queued: float | None = None  # max(reported running + waiting, in flight) (None: no report)
    kv_usage: float = 0.0
    cached_tokens: int = 0  # of this request's prompt, per the kvcache index

    @property
    def load(self) -> float:
        return self.queued if self.queued is not None else float(self.num_in_flight)


@dataclass(frozen=True)
class RoutingPolicy:
    policy: str = "kv_aware"
    prefix_load_bound: float = 4.0  # requests a prefix may pull above the least load ...
    prefix_load_ratio: float = 1.5  # ... or this ratio of it, if more
    kv_full: float = 0.95


def standby_active(replicas: list[ReplicaLoad]) -> bool:
    """Standbys take requests while some regular replica is not ready."""
    regular = [r for r in replicas if not r.is_standby]
    return any(r.is_standby for r in replicas) and not all(r.is_ready for r in regular)


class ReplicaChooser:
    def __init__(self, policy: RoutingPolicy = RoutingPolicy()):
        assert policy.policy in POLICIES, policy.policy
        self.policy = policy
        self._turns = itertools.count()

    def pick(self, replicas: list[ReplicaLoad]) -> str | None:
        use_standby = standby_active(replicas)
        ready = [r for r in replicas if r.is_ready and (use_standby or not r.is_standby)]
        if not ready:
            return None
        if self.policy.policy == "round_robin":
            return ready[next(self._turns) % len(ready)].name
        least = min(ready, key=lambda r: (r.load, r.num_in_flight))
        if self.policy.policy == "least_loaded":
            return least.name
        p = self.policy
        bound = least.load + max(p.prefix_load_bound, (p.prefix_load_ratio - 1) * least.load)
        candidates = [r for r in ready if r.load <= bound]
        candidates = [r for r in candidates if r.kv_usage < p.kv_full] or candidates
        best = max(candidates, key=lambda r: (r.cached_tokens, -r.load, -r.num_in_flight))
        if best.cached_tokens:
            return best.name
        return min(candidates, key=lambda r: (r.load, r.num_in_flight)).name
