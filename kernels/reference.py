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


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, q_starts: torch.Tensor,
                                q_lens: torch.Tensor, ctx_lens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Causal attention of each prefill chunk over its paged keys, in fp32, returned in
    q's dtype: chunk c's queries are rows q_starts[c] .. + q_lens[c] of q, at positions
    ctx_lens[c] - q_lens[c] ..; its keys 0 .. ctx_lens[c] - 1 fill block_tables[c].
    Rows no chunk owns are zero."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for c in range(q_lens.shape[0]):
        start, q_len, ctx = int(q_starts[c]), int(q_lens[c]), int(ctx_lens[c])
        blocks = block_tables[c, :(ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qc = q[start:start + q_len].float()  # [q_len, heads, d]
        scores = torch.einsum("qhd,khd->hqk", qc, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v: [num_tokens, kvh, d] into caches at slot_mapping (negative = skip)."""
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = v[keep]


def copy_blocks_ref(cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    for src, dst in pairs:
        cache[dst] = cache[src]


# Fused elementwise ops (kernels/fused.cu), following services/executor/model.py.

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.py RMSNorm's half-precision branch (HF): normalise in fp32, round to x's
    dtype, then weight * that (in the dtype: one more rounding)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> None:
    """In place, as the kernel: residual = residual + x (rounded once), x = rms_norm(residual);
    the decoder layer's `h = h + attn_out; y = norm(h)`."""
    residual.copy_(residual + x)
    x.copy_(rms_norm_ref(residual, weight, eps))


def rope_neox_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """In place: model.py apply_rope on the first num_heads heads of each row, in fp32 with
    the fp32 tables (model.py rounds the tables and every op to the dtype), rounded once."""
    width = num_heads * head_dim
    x = qkv[:, :width].float().view(-1, num_heads, head_dim)
    c, s = cos[positions].float().unsqueeze(1), sin[positions].float().unsqueeze(1)
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    qkv[:, :width] = (x * c + rotated * s).reshape(-1, width).to(qkv.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """model.py MLP's silu(gate) * up over x = [gate | up], in fp32, rounded once."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
