"""Router core, free of grpc: replica choice."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaLoad:
    name: str
    is_ready: bool
    num_in_flight: int


def pick_replica(replicas: list[ReplicaLoad]) -> str | None:
    """Least loaded ready replica (fewest requests in flight from this router)."""
    ready = [r for r in replicas if r.is_ready]
    if not ready:
        return None
    return min(ready, key=lambda r: r.num_in_flight).name
