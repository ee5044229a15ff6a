"""KV cache manager: the block tables of all sequences over one BlockPool.

Sequences are addressed by id. The manager knows token ids only to hash full
blocks for prefix caching (chained hashes, salted per tenant); it never sees
KV memory. Copy-on-write: a sequence about to write into a block it shares
(after `fork`) gets a private copy, reported as a (src, dst) pair that the
executor must apply before the step's attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.services.common.block_hash import hash_block
from llmesh.services.scheduler.block_pool import BlockPool, EventSink


@dataclass
class Allocation:
    """Result of `allocate_slots`: how the sequence's block table changed."""

    num_kept_blocks: int  # table[:num_kept_blocks] unchanged ...
    new_block_ids: list[int]  # ... then these follow
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies


@dataclass
class KVStats:
    num_blocks: int
    num_used_blocks: int
    usage: float  # used blocks / all blocks
    num_allocated_slots: int
    num_filled_slots: int
    waste: float  # allocated slots holding no token / allocated slots
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which found
    prefix_hit_rate: float
    num_evictions: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_event: EventSink | None = None):
        self.pool = BlockPool(num_blocks, block_size, on_event)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of a sequence's cached full blocks
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- prefix cache -------------------------------------------------
    def limit_blocks(self, num_blocks: int) -> None:
        """Shrink an unused manager to `num_blocks` (a replica's capacity is its smallest rank's)."""
        if self.pool.num_used:
            raise RuntimeError("cannot resize a KV manager with blocks in use")
        self.pool.reset_prefix_cache()  # (an index following the pool hears of it)
        self.pool = BlockPool(num_blocks, self.pool.block_size, self.pool.on_event)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block: the KV memory they indexed is gone (a restarted
        executor). Only when no sequence holds blocks."""
        assert not self.tables, "reset_prefix_cache with sequences holding blocks"
        self.pool.reset_prefix_cache()

    def find_cached_prefix(self, token_ids: list[int], salt: str = "") -> list[int]:
        """Block ids caching the longest prefix of `token_ids` (no references taken).

        At most len-1 tokens can hit: the last one is always computed so that
        the step produces its logits.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits, parent = [], b""
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs], salt)
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_blocks(self, seq_id: str, token_ids: list[int], num_computed: int, num_new: int,
                     salt: str = "") -> None:
        """After a step computed `num_new` tokens up to `num_computed`: count the
        filled slots and register the blocks that are now full."""
        table = self.tables[seq_id]
        bs = self.block_size
        fill = self.pool.fill
        if num_new == 1:  # (a decode token: its block holds one more)
            fill(table[(num_computed - 1) // bs], (num_computed - 1) % bs + 1)
        else:
            for i in range((num_computed - num_new) // bs, -(-num_computed // bs)):
                fill(table[i], min(bs, num_computed - i * bs))
        if not self.enable_prefix_caching or num_computed < bs:
            return
        hashes = self._hashes.get(seq_id)
        if hashes is None:
            hashes = self._hashes[seq_id] = []
        elif len(hashes) >= num_computed // bs:
            return  # (most steps: no block became full)
        for i in range(len(hashes), num_computed // bs):
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, token_ids[i * bs:(i + 1) * bs], salt))
            self.pool.cache(table[i], hashes[-1], parent)

    # ---- allocation ---------------------------------------------------
    def allocate_slots(self, seq_id: str, num_total_tokens: int, write_from: int,
                       cached_block_ids: list[int] | None = None) -> Allocation | None:
        """Make the sequence's table cover `num_total_tokens` slots.

        `write_from` is the first position this step writes; a shared block at
        or after it is copied first. A new sequence passes its prefix hits as
        `cached_block_ids`. Returns None (changing nothing) when blocks run out.
        """
        table = self.tables.get(seq_id)
        bs = self.block_size
        if table is not None and num_total_tokens <= len(table) * bs:
            # the common decode step: the table covers it already, and unless a block
            # it writes is shared (copy-on-write, below) nothing changes
            blocks, first = self.pool.blocks, write_from // bs
            if (blocks[table[-1]].ref_count <= 1 if first == len(table) - 1 else
                    all(blocks[table[i]].ref_count <= 1 for i in range(first, len(table)))):
                return Allocation(len(table), [])
        is_new = table is None
        if is_new:
            table = list(cached_block_ids or [])
        num_needed = max(0, -(-num_total_tokens // bs) - len(table))
        shared = [i for i in range(write_from // bs, len(table))
                  if self.pool.blocks[table[i]].ref_count > (0 if is_new else 1)]
        # prefix hits still in the free queue must not be handed out below
        num_idle_hits = sum(self.pool.blocks[b].ref_count == 0 for b in table) if is_new else 0
        if num_needed + len(shared) > self.pool.num_free - num_idle_hits:
            return None
        if is_new:
            self.pool.touch(table)
            self.tables[seq_id] = table
        new_ids = self.pool.allocate(num_needed + len(shared))
        num_kept = len(table)
        copies = []
        if shared:
            num_kept = shared[0]
            for i, dst in zip(shared, new_ids):
                copies.append((table[i], dst))
                self.pool.free([table[i]])
                table[i] = dst
            self._hashes[seq_id] = self._hashes.get(seq_id, [])[:num_kept]
        table.extend(new_ids[len(shared):])
        return Allocation(num_kept, table[num_kept:], copies)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        table = self.tables[parent_id]
        self.pool.touch(table)
        self.tables[child_id] = list(table)
        self._hashes[child_id] = list(self._hashes.get(parent_id, []))

    def free(self, seq_id: str) -> None:
        table = self.tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        if table:
            self.pool.free(table[::-1])

    def block_ids(self, seq_id: str) -> list[int]:
        return self.tables[seq_id]

    def stats(self) -> KVStats:
        num_used = self.pool.num_used
        allocated = num_used * self.block_size
        filled = self.pool.num_filled_used
        return KVStats(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=num_used,
            usage=num_used / self.pool.num_blocks,
            num_allocated_slots=allocated,
            num_filled_slots=filled,
            waste=(allocated - filled) / allocated if allocated else 0.0,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
            prefix_hit_rate=self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
            num_evictions=self.pool.num_evictions,
        )

