"""The prefix index of every replica, built from their block pools' events.

Per replica: the cached block hashes (with their parents), the epoch of the
pool they describe and the next event id expected. A batch that does not
continue exactly where the index is (a gap, or another epoch: the scheduler
restarted) is refused and the replica marked stale until a snapshot arrives;
the index never guesses. `match` answers how many leading blocks of a token
sequence each replica holds, hashing them the way the pools do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.services.common.block_hash import prefix_hashes
from llmesh.services.common.kv_events import CLEARED, REMOVED, STORED, EventBatch, Snapshot


@dataclass
class ReplicaIndex:
    epoch: int = 0
    next_event_id: int = 0
    block_size: int = 0
    blocks: dict[bytes, bytes] = field(default_factory=dict)  # hash -> parent hash
    is_synced: bool = False
    num_snapshots: int = 0
    num_events: int = 0


class PrefixIndex:
    def __init__(self):
        self.replicas: dict[str, ReplicaIndex] = {}

    def load_snapshot(self, replica: str, snap: Snapshot) -> None:
        r = self.replicas.setdefault(replica, ReplicaIndex())
        r.epoch, r.next_event_id, r.block_size = snap.epoch, snap.next_event_id, snap.block_size
        r.blocks = dict(snap.blocks)
        r.is_synced = True
        r.num_snapshots += 1

    def apply(self, replica: str, batch: EventBatch) -> str:
        """Apply a batch; returns "" or why a snapshot is needed (then nothing changed
        and the replica is stale: `match` reports nothing for it until resynced)."""
        r = self.replicas.get(replica)
        if r is None or not r.is_synced:
            return "no snapshot yet"
        if batch.epoch != r.epoch:
            reason = f"new epoch {batch.epoch} (was {r.epoch})"
        elif batch.first_event_id != r.next_event_id:
            reason = f"gap: expected event {r.next_event_id}, got {batch.first_event_id}"
        else:
            reason = ""
        if reason:
            r.is_synced = False
            r.blocks = {}
            return reason
        for ev in batch.events:
            if ev.kind == STORED:
                r.blocks[ev.block_hash] = ev.parent_hash
            elif ev.kind == REMOVED:
                r.blocks.pop(ev.block_hash, None)
            elif ev.kind == CLEARED:
                r.blocks.clear()
        r.next_event_id += len(batch.events)
        r.num_events += len(batch.events)
        return ""

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def match(self, token_ids: list[int], salt: str = "") -> dict[str, int]:
        """Per replica: how many leading full blocks of `token_ids` it holds."""
        out: dict[str, int] = {}
        hashes_by_size: dict[int, list[bytes]] = {}
        for name, r in self.replicas.items():
            if not r.is_synced or not r.block_size:
                out[name] = 0
                continue
            hashes = hashes_by_size.get(r.block_size)
            if hashes is None:
                hashes = hashes_by_size[r.block_size] = prefix_hashes(token_ids, r.block_size, salt)
            n = 0
            for h in hashes:
                if h not in r.blocks:
                    break
                n += 1
            out[name] = n
        return out
