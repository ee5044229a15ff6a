"""Router core, free of grpc: replica choice."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaLoad:
    name: str
    is_ready: bool
    num_in_flight: int
    is_standby: bool = False


def standby_active(replicas: list[ReplicaLoad]) -> bool:
    """Standbys take requests while some regular replica is not ready."""
    regular = [r for r in replicas if not r.is_standby]
    return any(r.is_standby for r in replicas) and not all(r.is_ready for r in regular)


def pick_replica(replicas: list[ReplicaLoad]) -> str | None:
    """Least loaded ready replica (fewest requests in flight from this router); a
    warm standby only while a regular replica is down, hung or ejected."""
    use_standby = standby_active(replicas)
    ready = [r for r in replicas if r.is_ready and (use_standby or not r.is_standby)]
    if not ready:
        return None
    return min(ready, key=lambda r: r.num_in_flight).name
