"""Attention over the paged KV cache, behind one backend interface.

A step is a flat batch of tokens: first the single-query rows (decode tokens,
or a 1-token prefill chunk), sorted by context length, then multi-token
prefill chunks. The metadata that says where each query's keys live is built
once per step and reused by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

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
    groups: list[SingleQueryGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # for kernel backends: all single-query rows as one padded table (built on request)
    num_single: int = 0
    single_block_tables: torch.Tensor | None = None  # [num_single, max_blocks] int32
    single_context_lens: torch.Tensor | None = None  # [num_single] int32
    max_single_context: int = 0


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
        for g in meta.groups:
            rows = slice(g.row_start, g.row_start + g.num_rows)
            k = self._gather("k", k_cache, g.block_ids).view(g.num_rows, -1, *k_cache.shape[2:])
            v = self._gather("v", v_cache, g.block_ids).view(g.num_rows, -1, *v_cache.shape[2:])
            o = F.scaled_dot_product_attention(
                q[rows].unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H|KVH, L, D]
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
        shape = (block_ids.numel(), *cache.shape[1:])
        numel = shape[0] * cache[0].numel()
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                              dtype=cache.dtype, device=cache.device)
            self._workspace[name] = buf
        out = buf[:numel].view(shape)
        torch.index_select(cache, 0, block_ids, out=out)
        return out


@dataclass
class SeqSlice:
    """What the metadata builder needs of one sequence in the step."""

    num_computed: int  # tokens already in the cache before this step
    num_new: int  # tokens computed this step
    block_ids: list[int]


def build_metadata(seqs: list[SeqSlice], block_size: int, sliding_window: int | None,
                   device: torch.device, with_block_tables: bool = False) -> AttentionMetadata:
    """Build the per-step metadata. `seqs` lists single-query sequences first
    (best sorted by context length, longest first), then prefill chunks."""
    slot_mapping: list[int] = []
    singles: list[tuple[int, SeqSlice]] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for seq in seqs:
        table = seq.block_ids
        start, end = seq.num_computed, seq.num_computed + seq.num_new
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size
                            for p in range(start, end))
        if seq.num_new == 1:
            assert not prefills, "single-query sequences must come first"
            singles.append((row, seq))
        else:
            prefills.append(_prefill_chunk(row, seq, block_size, sliding_window, device))
        row += seq.num_new
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        prefills=prefills, num_single=len(singles))
    if with_block_tables:
        if singles:
            lens = [seq.num_computed + 1 for _, seq in singles]
            width = max(-(-n // block_size) for n in lens)
            rows = [seq.block_ids[:width] + [0] * (width - len(seq.block_ids[:width]))
                    for _, seq in singles]
            meta.single_block_tables = torch.tensor(rows, dtype=torch.int32, device=device)
            meta.single_context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
            meta.max_single_context = max(lens)
    else:
        meta.groups = [_single_group(g, block_size, sliding_window, device)
                       for g in _split_groups(singles)]
    return meta


def _split_groups(singles: list[tuple[int, SeqSlice]]) -> list[list[tuple[int, SeqSlice]]]:
    """Consecutive runs whose padding to the run's longest context stays small."""
    groups: list[list[tuple[int, SeqSlice]]] = []
    longest = total = 0
    for item in singles:
        ctx = item[1].num_computed + 1
        if groups:
            new_longest = max(longest, ctx)
            if new_longest * (len(groups[-1]) + 1) <= (1 + MAX_GROUP_PADDING) * (total + ctx):
                groups[-1].append(item)
                longest, total = new_longest, total + ctx
                continue
        groups.append([item])
        longest = total = ctx
    return groups


def _single_group(group, block_size, window, device) -> SingleQueryGroup:
    ctx_lens = [seq.num_computed + 1 for _, seq in group]
    max_blocks = -(-max(ctx_lens) // block_size)
    block_ids = []
    for (_, seq), ctx in zip(group, ctx_lens):
        used = seq.block_ids[:-(-ctx // block_size)]
        block_ids.extend(used + [used[0]] * (max_blocks - len(used)))
    k_pos = torch.arange(max_blocks * block_size, device=device)[None, :]
    ctx = torch.tensor(ctx_lens, dtype=torch.long, device=device)[:, None]
    mask = k_pos < ctx
    if window is not None:
        mask &= k_pos > ctx - 1 - window
    return SingleQueryGroup(
        row_start=group[0][0], num_rows=len(group), max_blocks=max_blocks,
        block_ids=torch.tensor(block_ids, dtype=torch.long, device=device),
        mask=mask[:, None, None, :])


def _prefill_chunk(row: int, seq: SeqSlice, block_size: int, window: int | None,
                   device) -> PrefillChunk:
    ctx_len = seq.num_computed + seq.num_new
    mask = None
    if seq.num_computed > 0 or (window is not None and ctx_len > window):
        q_pos = torch.arange(seq.num_computed, ctx_len, device=device)[:, None]
        k_pos = torch.arange(ctx_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    num_blocks = -(-ctx_len // block_size)
    return PrefillChunk(row, seq.num_new, ctx_len,
                        torch.tensor(seq.block_ids[:num_blocks], dtype=torch.long, device=device),
                        mask)
