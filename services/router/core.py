"""Router core, free of grpc: stop strings on text, replica choice."""
from __future__ import annotations

from dataclasses import dataclass


class StopMatcher:
    """Finds stop strings in streamed text. Holds back a tail that could still
    become a stop string, so text after a stop is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.is_stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.is_stopped = True
            self._held = ""
            return buf[:min(hits)]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


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
