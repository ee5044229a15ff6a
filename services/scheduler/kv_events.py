"""The block pool's events, numbered and batched for the kvcache index
(services/common/kv_events.py).

An epoch is drawn per pool lifetime (scheduler start); events are numbered
from 0 within it. `drain` hands out what happened since the last call as one
batch; `snapshot` gives the whole cached state instead, for an index that
starts, restarts, or missed something. No grpc here: the scheduler's
publisher sends the batches beside the step loop, never in it.
"""
from __future__ import annotations

import secrets

from llmesh.services.common.kv_events import EventBatch, KVEvent, Snapshot
from llmesh.services.scheduler.block_pool import BlockPool


class KVEventLog:
    def __init__(self, epoch: int | None = None, max_pending: int = 1 << 16):
        self.epoch = epoch if epoch is not None else secrets.randbits(63) or 1
        self.next_event_id = 0
        self.max_pending = max_pending
        self.needs_snapshot = False  # events were dropped: only a snapshot can follow
        self._pending: list[KVEvent] = []

    def record(self, kind: str, block_hash: bytes, parent_hash: bytes) -> None:
        """The pool's `on_event`. Bounded: when nobody drains (the index is down),
        the log drops what it holds and asks for a snapshot instead."""
        if len(self._pending) >= self.max_pending:
            self._pending = []
            self.needs_snapshot = True
        self._pending.append(KVEvent(kind, block_hash, parent_hash))

    def drain(self) -> EventBatch | None:
        if not self._pending or self.needs_snapshot:
            return None
        batch = EventBatch(self.epoch, self.next_event_id, self._pending)
        self.next_event_id += len(self._pending)
        self._pending = []
        return batch

    def snapshot(self, pool: BlockPool) -> Snapshot:
        """The pool as it is now; events not yet drained are part of it, so they
        are dropped (the next batch continues from here)."""
        self._pending = []
        self.needs_snapshot = False
        return Snapshot(self.epoch, self.next_event_id, pool.block_size, pool.cached_blocks())
