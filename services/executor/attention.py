"""Attention over the paged KV cache, behind one backend interface.

A step is a flat batch of tokens: first the single-query rows (decode tokens,
or a 1-token prefill chunk), then multi-token prefill chunks. The metadata
that says where each query's keys live is built once per step and reused by
every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's multi-token chunk: rows [q_start, q_start + q_len) of the batch."""

    q_start: int
    q_len: int
    key_slots: torch.Tensor  # [ctx_len] slot index of every key position 0..ctx_len-1
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None = plain causal (no prior context)


@dataclass
class AttentionMetadata:
    """Where this step's tokens write their K/V and which keys each query sees."""

    slot_mapping: torch.Tensor  # [num_tokens] long
    num_single: int  # rows [0, num_single) have one query token each
    single_key_slots: torch.Tensor | None  # [num_single, max_ctx] long (padded with 0)
    single_mask: torch.Tensor | None  # [num_single, 1, 1, max_ctx] bool
    prefills: list[PrefillChunk] = field(default_factory=list)


class AttentionBackend(Protocol):
    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """Reference backend (CPU and GPU): gathers keys by slot, then SDPA.

    Caches are `[num_blocks, block_size, num_kv_heads, head_dim]`; a slot is
    `block_id * block_size + offset`.
    """

    def write_kv(self, k_cache, v_cache, k, v, meta):
        # k, v: [num_tokens, num_kv_heads, head_dim]
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    def attend(self, q, k_cache, v_cache, meta, scale):
        # q: [num_tokens, num_heads, head_dim] -> out: same shape
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        out = torch.empty_like(q)
        if meta.num_single:
            qs = q[: meta.num_single].unsqueeze(2)  # [B, H, 1, D]
            ks = k_flat[meta.single_key_slots].transpose(1, 2)  # [B, KVH, L, D]
            vs = v_flat[meta.single_key_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=meta.single_mask, scale=scale, enable_gqa=True
            )
            out[: meta.num_single] = o.squeeze(2)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            kp = k_flat[chunk.key_slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
            vp = v_flat[chunk.key_slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                scale=scale, enable_gqa=True,
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out


@dataclass
class SeqSlice:
    """What the metadata builder needs of one sequence in the step."""

    num_computed: int  # tokens already in the cache before this step
    num_new: int  # tokens computed this step
    block_ids: list[int]


def build_metadata(seqs: list[SeqSlice], block_size: int, sliding_window: int | None,
                   device: torch.device) -> AttentionMetadata:
    """Build the per-step metadata. `seqs` must list single-query sequences first."""
    slot_mapping: list[int] = []
    num_single = 0
    single_ctx: list[int] = []
    single_tables: list[list[int]] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for seq in seqs:
        table = seq.block_ids
        start, end = seq.num_computed, seq.num_computed + seq.num_new
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size
                            for p in range(start, end))
        if seq.num_new == 1:
            assert not prefills, "single-query sequences must come first"
            num_single += 1
            single_ctx.append(end)
            single_tables.append(table)
        else:
            prefills.append(_prefill_chunk(row, seq, block_size, sliding_window, device))
        row += seq.num_new
    single_slots = single_mask = None
    if num_single:
        single_slots, single_mask = _single_metadata(
            single_tables, single_ctx, block_size, sliding_window, device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        num_single=num_single,
        single_key_slots=single_slots,
        single_mask=single_mask,
        prefills=prefills,
    )


def _key_slots(table: list[int], ctx_len: int, block_size: int, device) -> torch.Tensor:
    num_blocks = (ctx_len + block_size - 1) // block_size
    blocks = torch.tensor(table[:num_blocks], dtype=torch.long, device=device)
    slots = (blocks[:, None] * block_size + torch.arange(block_size, device=device)).flatten()
    return slots[:ctx_len]


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
    return PrefillChunk(row, seq.num_new, _key_slots(seq.block_ids, ctx_len, block_size, device),
                        mask)


def _single_metadata(tables, ctx_lens, block_size, window, device):
    max_ctx = max(ctx_lens)
    max_blocks = (max_ctx + block_size - 1) // block_size
    padded = torch.zeros(len(tables), max_blocks, dtype=torch.long)
    for i, table in enumerate(tables):
        n = min(len(table), max_blocks)
        padded[i, :n] = torch.tensor(table[:n], dtype=torch.long)
    padded = padded.to(device)
    offsets = torch.arange(block_size, device=device)
    slots = (padded[:, :, None] * block_size + offsets).flatten(1)[:, :max_ctx]  # [B, max_ctx]
    k_pos = torch.arange(max_ctx, device=device)[None, :]
    ctx = torch.tensor(ctx_lens, dtype=torch.long, device=device)[:, None]
    mask = k_pos < ctx
    if window is not None:
        mask &= k_pos > ctx - 1 - window
    slots = torch.where(mask, slots, torch.zeros_like(slots))
    return slots, mask[:, None, None, :]
