"""CUDA kernels against the torch reference over a grid of shapes (GPU only)."""
import random

import pytest
import torch

from llmesh.kernels import ops
from paged_tables import random_block_tables
from llmesh.kernels.reference import (copy_blocks_ref, paged_decode_attention_ref,
                                     paged_prefill_attention_ref, reshape_and_cache_ref)

CASES = [
    # batch, max context, kv heads, group, block size, head dim
    (1, 1, 8, 1, 16, 128), (1, 32768, 8, 4, 16, 128), (3, 4097, 2, 8, 32, 64),
    (16, 4096, 8, 4, 16, 128), (64, 1000, 4, 1, 32, 128), (256, 300, 8, 8, 16, 64),
    (7, 16384, 1, 8, 32, 128),
    # head dim 256, block 64, and groups that are not a power of two (6, 3)
    (5, 2000, 2, 6, 64, 256), (9, 777, 4, 3, 32, 64), (33, 5000, 8, 4, 64, 128),
    (2, 70, 1, 8, 16, 256),
]


def _paged(batch, max_ctx, kvh, block_size, head_dim, dtype, seed):
    rng = random.Random(seed)
    lens = [max_ctx] + [rng.randint(1, max_ctx) for _ in range(batch - 1)]
    tables, num_blocks = random_block_tables(lens, block_size, seed)
    shape = (num_blocks, block_size, kvh, head_dim)
    k = torch.randn(shape, dtype=dtype, device="cuda")
    v = torch.randn(shape, dtype=dtype, device="cuda")
    return k, v, tables.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-ctx{}-kv{}-g{}-bs{}-d{}".format(*c))
def test_paged_decode_matches_reference(case, dtype):
    batch, max_ctx, kvh, group, block_size, head_dim = case
    k, v, tables, lens = _paged(batch, max_ctx, kvh, block_size, head_dim, dtype, seed=batch)
    q = torch.randn(batch, kvh * group, head_dim, dtype=dtype, device="cuda")
    scale = head_dim ** -0.5
    ref = paged_decode_attention_ref(q, k, v, tables, lens, scale).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for splits in (None, 1, 4, 37):
        out = ops.paged_decode_attention(q, k, v, tables, lens, scale, num_splits=splits).float()
        assert torch.allclose(out, ref, atol=tol, rtol=tol), (splits, (out - ref).abs().max())
    # a bound far above every context (as a CUDA graph captures it): many splits, each
    # sequence dividing its own context among them, some splits empty
    out = ops.paged_decode_attention(q, k, v, tables, lens, scale, max_context=131072).float()
    assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_ops_match_reference(dtype):
    k_cache = torch.zeros(10, 16, 2, 64, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k = torch.randn(5, 2, 64, dtype=dtype, device="cuda")
    v = torch.randn(5, 2, 64, dtype=dtype, device="cuda")
    slots = torch.tensor([3, 40, -1, 159, 17], device="cuda")
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    reshape_and_cache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    ops.copy_blocks(k_cache, torch.tensor([[0, 7], [9, 2]], device="cuda"))
    copy_blocks_ref(k_ref, [(0, 7), (9, 2)])
    assert torch.equal(k_cache, k_ref)


PREFILL_CASES = [
    # (cached, new) per chunk; kv heads, group, block size, head dim
    ([(0, 8192)], 8, 4, 16, 64),                      # a 1B-shaped 8k prefill
    ([(0, 1000), (4000, 512), (17, 3)], 8, 4, 16, 128),
    ([(0, 64), (64, 64), (1, 1)], 2, 8, 32, 128),
    ([(300, 700)], 4, 6, 64, 256), ([(0, 129), (5000, 77)], 1, 3, 32, 64),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES,
                         ids=lambda c: "n{}-kv{}-g{}-bs{}-d{}".format(len(c[0]), *c[1:]))
def test_paged_prefill_matches_reference(case, dtype):
    chunks, kvh, group, block_size, head_dim = case
    ctx = [n + m for n, m in chunks]
    tables, num_blocks = random_block_tables(ctx, block_size, seed=len(chunks))
    shape = (num_blocks, block_size, kvh, head_dim)
    k = torch.randn(shape, dtype=dtype, device="cuda")
    v = torch.randn(shape, dtype=dtype, device="cuda")
    lens = [m for _, m in chunks]
    q = torch.randn(5 + sum(lens), kvh * group, head_dim, dtype=dtype, device="cuda")
    starts = [5 + sum(lens[:i]) for i in range(len(lens))]
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
    args = (tables.cuda(), i32(starts), i32(lens), i32(ctx))
    scale = head_dim ** -0.5
    out = torch.zeros_like(q)
    ops.paged_prefill_attention(q, k, v, *args, scale, max_q_len=max(lens), out=out)
    ref = paged_prefill_attention_ref(q, k, v, *args, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert not out[:5].any()
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol), (out - ref).abs().max()
