"""The block pool: fixed-size KV blocks with ref counts, a free queue in LRU
order, and the prefix index (block hash -> cached block).

A freed block keeps its hash and stays findable until it is handed out again:
allocation takes blocks from the head of the free queue (least recently
freed, after the freed blocks that cache nothing), which evicts whatever
prefix they cached. `allocate` returns None
instead of raising when the pool cannot satisfy a request.

Every change to the prefix index is reported to `on_event` as it happens
(stored with its parent hash, removed, or all cleared), so an index elsewhere
(the kvcache service) can follow the pool without replaying its decisions.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from llmesh.services.common.kv_events import CLEARED, REMOVED, STORED

# (kind, block_hash, parent_hash): b"" where a field does not apply
EventSink = Callable[[str, bytes, bytes], None]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    parent_hash: bytes = b""  # the previous block's hash in its chain (b"": the first)
    num_filled: int = 0  # slots holding a computed token (for waste accounting)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, on_event: EventSink | None = None):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.num_evictions = 0
        self.on_event = on_event
        # filled slots of the blocks in use, kept as they change: KV stats are O(1)
        # (a GPU cache has hundreds of thousands of blocks)
        self.num_filled_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """Take `count` blocks (ref 1 each) or return None and change nothing."""
        if count > len(self._free):
            return None
        ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._uncache(block)
            block.ref_count = 1
            block.num_filled = 0
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference on each block (a prefix hit or a fork)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
                self.num_filled_used += block.num_filled
            block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each; blocks reaching 0 join the free queue's tail,
        or its head when they cache nothing (a partial block: no one can hit it, so
        it goes before any block that holds a prefix).

        Callers pass a request's blocks tail first so a sequence's last blocks
        (the least shareable) are evicted before its first ones.
        """
        free = self._free
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                free[block_id] = None
                if block.block_hash is None:
                    free.move_to_end(block_id, last=False)
                self.num_filled_used -= block.num_filled

    def fill(self, block_id: int, num_filled: int) -> None:
        """The block holds computed tokens in at least its first `num_filled` slots."""
        block = self.blocks[block_id]
        if num_filled > block.num_filled:
            if block.ref_count > 0:
                self.num_filled_used += num_filled - block.num_filled
            block.num_filled = num_filled

    def cache(self, block_id: int, block_hash: bytes, parent_hash: bytes = b"") -> None:
        """Register a full block under its hash (first writer wins)."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        self._cached[block_hash] = block_id
        if self.on_event is not None:
            self.on_event(STORED, block_hash, parent_hash)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (one CLEARED event, not one per block)."""
        for block in self.blocks:
            block.block_hash = None
            block.parent_hash = b""
        self._cached.clear()
        if self.on_event is not None:
            self.on_event(CLEARED, b"", b"")

    def cached_blocks(self) -> list[tuple[bytes, bytes]]:
        """(hash, parent hash) of every cached block: the index's snapshot."""
        return [(b.block_hash, b.parent_hash) for b in self.blocks if b.block_hash is not None]

    def _uncache(self, block: Block) -> None:
        del self._cached[block.block_hash]
        if self.on_event is not None:
            self.on_event(REMOVED, block.block_hash, b"")
        block.block_hash = None
        block.parent_hash = b""
        self.num_evictions += 1

    def check_invariants(self) -> None:
        """Internal consistency, for tests: free queue == blocks with ref 0, index == hashed blocks."""
        free = set(self._free)
        assert len(free) == len(self._free)
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in free), block
            if block.block_hash is not None:
                assert self._cached[block.block_hash] == block.block_id
        assert len(self._cached) == sum(b.block_hash is not None for b in self.blocks)
        assert self.num_filled_used == sum(b.num_filled for b in self.blocks if b.ref_count > 0)
