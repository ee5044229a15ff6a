"""Attention over the paged KV cache, behind one backend interface.

A step is a flat batch of tokens: first the single-query rows (decode tokens,
or a 1-token prefill chunk), sorted by context length, then multi-token
prefill chunks. The metadata that says where each query's keys live is built
once per step and reused by every layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from llmesh.services.executor.staging import Staging

# a group of single-query rows is padded to its longest context; a new group
# starts when padding would exceed this share of the group's real keys
MAX_GROUP_PADDING = 0.25


@dataclass
class SingleQueryGroup:
    """Rows [row_start, row_start + num_rows) with one query each, padded to max_blocks."""

    row_start: int
    num_rows: int
    max_blocks: int
    block_ids: torch.Tensor  # [num_rows * max_blocks] long (padding repeats a valid id)
    mask: torch.Tensor  # [num_rows, 1, 1, max_blocks * block_size] bool: key visible


@dataclass
class PrefillChunk:
    """One sequence's multi-token chunk: rows [q_start, q_start + q_len) of the batch."""

    q_start: int
    q_len: int
    ctx_len: int  # keys 0..ctx_len-1 (cached ones plus this chunk)
    block_ids: torch.Tensor  # [ceil(ctx_len / block_size)] long
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None = plain causal (no prior context)


@dataclass
class AttentionMetadata:
    """Where this step's tokens write their K/V and which keys each query sees."""

    slot_mapping: torch.Tensor  # [num_tokens] long: block_id * block_size + offset
    positions: torch.Tensor | None = None  # [num_tokens] long: each token's position
    groups: list[SingleQueryGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # for kernel backends: all single-query rows as one padded table (built on request)
    num_single: int = 0
    single_block_tables: torch.Tensor | None = None  # [num_single, max_blocks] int32
    single_context_lens: torch.Tensor | None = None  # [num_single] int32
    max_single_context: int = 0
    # the prefill chunks as one padded table (on request, without a sliding window)
    prefill_block_tables: torch.Tensor | None = None  # [num_chunks, max_blocks] int32
    prefill_bounds: torch.Tensor | None = None  # [3, num_chunks] int32: q start, q len, ctx
    max_prefill_len: int = 0  # the longest chunk (tokens)


class AttentionBackend(Protocol):
    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """Reference backend (CPU and GPU): gathers each sequence's blocks, then SDPA.

    Caches are `[num_blocks, block_size, num_kv_heads, head_dim]`. Gathers go
    into reused workspace buffers: fresh multi-MB allocations every layer would
    cost more in page faults than the copy itself.
    """

    wants_block_tables = False
    wants_prefill_tables = False  # the prefill chunks' table and bounds too (a prefill kernel)

    def __init__(self):
        self._workspace: dict[str, torch.Tensor] = {}

    def write_kv(self, k_cache, v_cache, k, v, meta):
        # k, v: [num_tokens, num_kv_heads, head_dim]
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    def attend(self, q, k_cache, v_cache, meta, scale):
        # q: [num_tokens, num_heads, head_dim] -> out: same shape
        out = torch.empty_like(q)
        self.attend_prefills(q, k_cache, v_cache, meta, scale, out)
        # single queries over a 16-bit cache on a CPU: in float32 (torch's CPU kernel for
        # one bfloat16 query is 3-10x slower than for float32; widening the gathered
        # keys costs less; out[rows] = o rounds back)
        widen = q.dtype != torch.float32 and q.device.type == "cpu"
        for g in meta.groups:
            rows = slice(g.row_start, g.row_start + g.num_rows)
            k = self._gather("k", k_cache, g.block_ids).view(g.num_rows, -1, *k_cache.shape[2:])
            v = self._gather("v", v_cache, g.block_ids).view(g.num_rows, -1, *v_cache.shape[2:])
            qg = q[rows]
            if widen:
                qg, k, v = qg.float(), self._widened("kf", k), self._widened("vf", v)
            o = F.scaled_dot_product_attention(
                qg.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H|KVH, L, D]
                attn_mask=g.mask, scale=scale, enable_gqa=True)
            out[rows] = o.squeeze(2)
        return out

    def attend_prefills(self, q, k_cache, v_cache, meta, scale, out) -> None:
        for c in meta.prefills:
            rows = slice(c.q_start, c.q_start + c.q_len)
            k = self._gather("k", k_cache, c.block_ids).flatten(0, 1)[:c.ctx_len]
            v = self._gather("v", v_cache, c.block_ids).flatten(0, 1)[:c.ctx_len]
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0), attn_mask=c.mask, is_causal=c.mask is None,
                scale=scale, enable_gqa=True)  # [1, H, q_len, D]
            out[rows] = o.squeeze(0).transpose(0, 1)

    def _gather(self, name: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """cache[block_ids] into a reused buffer: [len(block_ids), block_size, kvh, d]."""
        out = self._buffer(name, (block_ids.numel(), *cache.shape[1:]), cache.dtype, cache.device)
        torch.index_select(cache, 0, block_ids, out=out)
        return out

    def _widened(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x as float32, in a reused buffer."""
        return self._buffer(name, x.shape, torch.float32, x.device).copy_(x)

    def _buffer(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                              dtype=dtype, device=device)
            self._workspace[name] = buf
        return buf[:numel].view(shape)


@dataclass
class SeqSlice:
    """What the metadata builder needs of one sequence in the step."""

    num_computed: int  # tokens already in the cache before this step
    num_new: int  # tokens computed this step
    block_ids: list[int]


def build_metadata(seqs: list[SeqSlice], block_size: int, sliding_window: int | None,
                   device: torch.device, with_block_tables: bool = False,
                   staging: Staging | None = None,
                   with_prefill_tables: bool = False) -> AttentionMetadata:
    """Build the per-step metadata. `seqs` lists single-query sequences first
    (best sorted by context length, longest first), then prefill chunks.

    The integer inputs (positions, slot mapping, block tables, context lengths)
    are built on the host with vectorised code and reach the device through
    `staging`, in the one copy of its next flush (made here: put the step's
    other arrays before calling); masks are then made on the device."""
    n = len(seqs)
    starts = np.fromiter((s.num_computed for s in seqs), np.int64, n)
    counts = np.fromiter((s.num_new for s in seqs), np.int64, n)
    lens = np.fromiter((len(s.block_ids) for s in seqs), np.int64, n)
    # every sequence's block table as one padded [n, width] array (padding: block 0)
    table = np.zeros((n, max(1, int(lens.max(initial=0)))), np.int64)
    table[np.arange(table.shape[1]) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(s.block_ids for s in seqs), np.int64, int(lens.sum()))
    return metadata_from_arrays(starts, counts, table, block_size, sliding_window, device,
                                with_block_tables, staging, with_prefill_tables)


def metadata_from_arrays(starts: np.ndarray, counts: np.ndarray, table: np.ndarray,
                         block_size: int, sliding_window: int | None, device: torch.device,
                         with_block_tables: bool = False,
                         staging: Staging | None = None,
                         with_prefill_tables: bool = False) -> AttentionMetadata:
    """`build_metadata` from arrays: per sequence (in the step's order) the tokens
    already cached (`starts`) and computed now (`counts`), and its block table
    (`table`, one row each, at least as wide as its blocks; entries past them are
    never read)."""
    staging = staging or Staging(device)
    n = starts.size
    multi = counts != 1
    num_single = int(np.argmax(multi)) if multi.any() else n
    assert multi[num_single:].all(), "single-query sequences must come first"
    # per token: its sequence and position (a decode-only step: one each)
    if num_single == n:
        owner, first_row, positions = np.arange(n), np.arange(n), starts
    else:
        owner = np.repeat(np.arange(n), counts)
        first_row = np.cumsum(counts) - counts
        positions = starts[owner] + np.arange(owner.size) - first_row[owner]
    slots = table[owner, positions // block_size] * block_size + positions % block_size
    ctx = starts + counts  # keys each sequence's last query sees
    need = -(-ctx // block_size)  # blocks those keys fill

    staged_pos, staged_slots = staging.put(positions), staging.put(slots)
    staged_tables = staged_ctx = None
    groups = []
    if num_single and with_block_tables:
        width = int(need[:num_single].max())
        staged_tables = staging.put(table[:num_single, :width].astype(np.int32))
        staged_ctx = staging.put(ctx[:num_single].astype(np.int32))
    elif num_single:
        for lo, hi in _split_groups(ctx[:num_single].tolist()):
            width = int(need[lo:hi].max())
            groups.append((lo, hi, width, staging.put(table[lo:hi, :width].reshape(-1)),
                           staging.put(ctx[lo:hi])))
    chunks = [(i, staging.put(table[i, :need[i]])) for i in range(num_single, n)]
    staged_chunks = None
    if num_single < n and with_prefill_tables and sliding_window is None:
        staged_chunks = (staging.put(table[num_single:, :int(need[num_single:].max())]
                                     .astype(np.int32)),
                         staging.put(np.stack([first_row[num_single:], counts[num_single:],
                                               ctx[num_single:]]).astype(np.int32)))
    staging.flush()

    meta = AttentionMetadata(slot_mapping=staged_slots.tensor, num_single=num_single)
    meta.positions = staged_pos.tensor
    if staged_tables is not None:
        meta.single_block_tables = staged_tables.tensor
        meta.single_context_lens = staged_ctx.tensor
        meta.max_single_context = int(ctx[:num_single].max())
    if staged_chunks is not None:
        meta.prefill_block_tables = staged_chunks[0].tensor
        meta.prefill_bounds = staged_chunks[1].tensor
        meta.max_prefill_len = int(counts[num_single:].max())
    meta.groups = [_single_group(lo, hi, width, ids.tensor, c.tensor, block_size,
                                 sliding_window, device)
                   for lo, hi, width, ids, c in groups]
    meta.prefills = [_prefill_chunk(int(first_row[i]), int(starts[i]), int(counts[i]),
                                    ids.tensor, sliding_window, device)
                     for i, ids in chunks]
    return meta


def _split_groups(ctx_lens: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [lo, hi) of single-query rows whose padding to the run's
    longest context stays small."""
    groups: list[tuple[int, int]] = []
    lo, longest, total = 0, 0, 0
    for i, ctx in enumerate(ctx_lens):
        if i > lo:
            new_longest = max(longest, ctx)
            if new_longest * (i - lo + 1) <= (1 + MAX_GROUP_PADDING) * (total + ctx):
                longest, total = new_longest, total + ctx
                continue
            groups.append((lo, i))
        lo, longest, total = i, ctx, ctx
    if ctx_lens:
        groups.append((lo, len(ctx_lens)))
    return groups


def _single_group(lo: int, hi: int, max_blocks: int, block_ids: torch.Tensor,
                  ctx: torch.Tensor, block_size: int, window, device) -> SingleQueryGroup:
    k_pos = torch.arange(max_blocks * block_size, device=device)[None, :]
    mask = k_pos < ctx[:, None]
    if window is not None:
        mask &= k_pos > ctx[:, None] - 1 - window
    return SingleQueryGroup(row_start=lo, num_rows=hi - lo, max_blocks=max_blocks,
                            block_ids=block_ids, mask=mask[:, None, None, :])


def _prefill_chunk(row: int, num_computed: int, num_new: int, block_ids: torch.Tensor,
                   window: int | None, device) -> PrefillChunk:
    ctx_len = num_computed + num_new
    mask = None
    if num_computed > 0 or (window is not None and ctx_len > window):
        q_pos = torch.arange(num_computed, ctx_len, device=device)[:, None]
        k_pos = torch.arange(ctx_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    return PrefillChunk(row, num_new, ctx_len, block_ids, mask)
