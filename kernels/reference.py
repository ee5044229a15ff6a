"""Torch reference implementations of the CUDA kernels: the test oracle."""
from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, kvh, head_dim];
    block_tables [num_seqs, max_blocks]; context_lens [num_seqs] -> [num_seqs, num_heads, head_dim].
    Computed in fp32, returned in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(num_seqs):
        ctx = int(context_lens[i])
        blocks = block_tables[i, :(ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()  # [ctx, kvh, d]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        qi = q[i].float().view(num_kv_heads, group, head_dim)
        scores = torch.einsum("hgd,thd->hgt", qi, k) * scale
        probs = scores.softmax(dim=-1)
        out[i] = torch.einsum("hgt,thd->hgd", probs, v).reshape(num_heads, head_dim).to(q.dtype)
    return out


def reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v: [num_tokens, kvh, d] into caches at slot_mapping (negative = skip)."""
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = v[keep]


def copy_blocks_ref(cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    for src, dst in pairs:
        cache[dst] = cache[src]
