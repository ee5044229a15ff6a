"""The runner's persistent batch: every live sequence's step state in arrays
indexed by a slot it keeps while it lives.

A step's inputs are then gathers over the scheduled sequences' slots: the
tokens they compute (a decode step: the last token of each), their positions,
their block tables and context lengths, and, for sequences that sample plainly
(no grammar, penalties, logprobs or n > 1), the sampling parameters, seeds and
choice indices the sampler keys its draws with. The plan's diffs (new and
finished sequences, kept and new blocks, the tokens a step appends) are applied
to the arrays, never rebuilt per step. Each sequence's whole token list stays in
the runner's SeqState (prefill chunks, penalties, forks and grammars read it).
"""
from __future__ import annotations

import numpy as np

from llmesh.services.common.sampling_params import SamplingParams


def is_plain(params: SamplingParams, has_grammar: bool) -> bool:
    """Sampling the fast path does from the arrays alone (one row per sequence)."""
    return (not has_grammar and params.n == 1 and params.logprobs is None
            and params.repetition_penalty == 1.0 and not params.frequency_penalty
            and not params.presence_penalty)


class BatchState:
    def __init__(self, capacity: int = 64, width: int = 16):
        self._free: list[int] = []
        self._size = 0
        self._alloc(capacity, width)

    def _alloc(self, capacity: int, width: int) -> None:
        old = getattr(self, "table", None)
        fields = {"last_token": np.int64, "num_tokens": np.int64, "num_computed": np.int64,
                  "num_blocks": np.int64, "seed": np.uint64, "index": np.uint64,
                  "temperature": np.float32, "top_k": np.int64, "top_p": np.float32,
                  "min_p": np.float32, "plain": bool}
        for name, dtype in fields.items():
            arr = np.zeros(capacity, dtype)
            if old is not None:
                prev = getattr(self, name)
                arr[:prev.size] = prev
            setattr(self, name, arr)
        table = np.zeros((capacity, width), np.int64)
        if old is not None:
            table[:old.shape[0], :old.shape[1]] = old
        self.table = table

    @property
    def capacity(self) -> int:
        return self.table.shape[0]

    def add(self, token_ids: list[int], num_computed: int, block_ids: list[int],
            params: SamplingParams, index: int, has_grammar: bool) -> int:
        """A new sequence's slot, filled."""
        slot = self._take()
        self.last_token[slot] = token_ids[-1] if token_ids else 0
        self.num_tokens[slot] = len(token_ids)
        self.num_computed[slot] = num_computed
        self.num_blocks[slot] = 0
        self.set_blocks(slot, 0, block_ids)
        self.seed[slot] = params.seed or 0  # (unseeded: greedy, which never draws)
        self.index[slot] = index
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.plain[slot] = is_plain(params, has_grammar)
        return slot

    def copy(self, slot: int, index: int) -> int:
        """A fork of `slot` (the same blocks, tokens and parameters) as choice `index`."""
        child = self._take()
        for arr in (self.last_token, self.num_tokens, self.num_computed, self.num_blocks,
                    self.seed, self.temperature, self.top_k, self.top_p, self.min_p,
                    self.plain):
            arr[child] = arr[slot]
        self.table[child] = self.table[slot]
        self.index[child] = index
        return child

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._size == self.capacity:
            self._alloc(2 * self.capacity, self.table.shape[1])
        slot, self._size = self._size, self._size + 1
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def set_blocks(self, slot: int, num_kept: int, new_block_ids: list[int]) -> None:
        """The slot's block table keeps its first `num_kept` entries and continues
        with `new_block_ids`."""
        end = num_kept + len(new_block_ids)
        if end > self.table.shape[1]:
            self._alloc(self.capacity, max(end, 2 * self.table.shape[1]))
        if new_block_ids:
            self.table[slot, num_kept:end] = new_block_ids
        self.num_blocks[slot] = end

    def blocks(self, slot: int) -> list[int]:
        return self.table[slot, :self.num_blocks[slot]].tolist()
