"""Block events: how a scheduler's block pool tells the kvcache index what it
caches. Shared by both sides (the proto mapping is in services/common/convert.py).

Events are numbered from 0 within an epoch (one pool lifetime); a snapshot is
the whole cached state at an event id."""
from __future__ import annotations

from dataclasses import dataclass, field

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass(frozen=True)
class KVEvent:
    kind: str  # STORED (with its parent hash), REMOVED, or CLEARED (everything)
    block_hash: bytes = b""
    parent_hash: bytes = b""


@dataclass
class EventBatch:
    epoch: int
    first_event_id: int
    events: list[KVEvent] = field(default_factory=list)


@dataclass
class Snapshot:
    epoch: int
    next_event_id: int  # the first id of the batch that follows it
    block_size: int
    blocks: list[tuple[bytes, bytes]]  # (hash, parent hash)
