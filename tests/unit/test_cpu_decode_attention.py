"""The C++ decode attention (kernels/cpu_decode_attention.h) for single-query rows over
a paged bfloat16 cache: as close to a float32 attention as a rounding of its output,
each row the same bits alone, in any batch and on any number of threads, what it
refuses, and the CPU backend taking it for a bfloat16 cache it can read."""
import numpy as np
import pytest
import torch

from llmesh.kernels import cpu_decode
from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
from llmesh.services.executor.attention_cpu import CompiledCpuAttention, paged_decode

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU decode kernel: {cpu_decode.unavailable()}")


def paged(heads, kv_heads, head_dim, block, contexts, seed=0, blocks=None):
    """Random caches, queries, and each row's blocks (disjoint, out of order), the
    table padded with block 0 past a row's last block."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block) for c in contexts]
    blocks = blocks or sum(need) + 1
    k, v = (torch.randn(blocks, block, kv_heads, head_dim, generator=g).bfloat16() for _ in "kv")
    order = torch.randperm(blocks - 1, generator=g) + 1
    table = torch.zeros(len(contexts), max(need), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = order[at:at + n]
        at += n
    q = torch.randn(len(contexts), heads, head_dim, generator=g).bfloat16()
    return q, k, v, table, torch.tensor(contexts, dtype=torch.int32)


def float32_attention(q, k, v, table, lens):
    return paged_decode(q.float(), k.float(), v.float(), table.long(), lens.long(),
                        q.shape[2] ** -0.5)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block", [
    (8, 4, 64, 16), (4, 4, 32, 8), (16, 2, 128, 32), (8, 1, 256, 16), (6, 3, 96, 16)])
def test_within_a_rounding_of_float32_attention(heads, kv_heads, head_dim, block):
    contexts = [1, 17, 300, 64, 5, 129, 48, 1000, 2, 33]
    q, k, v, table, lens = paged(heads, kv_heads, head_dim, block, contexts)
    got = cpu_decode.decode_attention(q, k, v, table, lens, head_dim ** -0.5, 2)
    want = float32_attention(q, k, v, table, lens)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    # float32 throughout, rounded once: within a rounding of the float32 result (and
    # the float32 sums' order, near zero)
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    # a row with one key attends to it alone: its value, exactly
    torch.testing.assert_close(got[0].float(), v[table[0, 0], 0].float().repeat_interleave(
        heads // kv_heads, dim=0), rtol=0, atol=0)


def test_each_row_is_the_same_alone_in_any_batch_and_on_any_team():
    contexts = [700, 3, 190, 64, 65, 1, 400, 250, 12, 90, 333, 41]
    q, k, v, table, lens = paged(8, 4, 64, 16, contexts, seed=4)
    whole = cpu_decode.decode_attention(q, k, v, table, lens, 0.125, 2)
    assert torch.equal(whole, cpu_decode.decode_attention(q, k, v, table, lens, 0.125, 1))
    for i in (0, 5, 11):
        alone = cpu_decode.decode_attention(q[i:i + 1], k, v, table[i:i + 1], lens[i:i + 1], 0.125, 1)
        assert torch.equal(alone[0], whole[i])
    # the rows in another order, with a wider table: the same rows
    perm = torch.tensor([11, 2, 7, 0])
    wide = torch.cat([table[perm], torch.zeros(4, 9, dtype=torch.int32)], dim=1)
    assert torch.equal(cpu_decode.decode_attention(q[perm], k, v, wide, lens[perm], 0.125, 2),
                       whole[perm])


def test_what_it_refuses():
    q, k, v, table, lens = paged(8, 4, 64, 16, [40, 20])
    with pytest.raises(ValueError, match="block ids|tables out of range"):
        bad = table.clone()
        bad[1, 1] = k.shape[0]  # a block the row reads, past the cache
        cpu_decode.decode_attention(q, k, v, bad, lens, 0.125, 1)
    with pytest.raises(ValueError, match="context lengths"):
        cpu_decode.decode_attention(q, k, v, table, torch.tensor([40, 0], dtype=torch.int32), 0.125, 1)
    with pytest.raises(ValueError, match="context lengths"):  # past its table (3 blocks)
        cpu_decode.decode_attention(q, k, v, table, torch.tensor([49, 20], dtype=torch.int32), 0.125, 1)
    with pytest.raises(ValueError, match="bfloat16 only"):
        cpu_decode.decode_attention(q.half(), k.half(), v.half(), table, lens, 0.125, 1)
    with pytest.raises(ValueError, match="head_dim 16"):
        cpu_decode.decode_attention(q[..., :16], k[..., :16].contiguous(), v[..., :16].contiguous(),
                                    table, lens, 0.125, 1)
    with pytest.raises(ValueError, match="query heads"):
        cpu_decode.decode_attention(q[:, :6], k, v, table, lens, 0.125, 1)
    # padding past a row's blocks is not read, so not checked
    padded = torch.cat([table, torch.full((2, 2), -1, dtype=torch.int32)], dim=1)
    assert torch.equal(cpu_decode.decode_attention(q, k, v, padded, lens, 0.125, 1),
                       cpu_decode.decode_attention(q, k, v, table, lens, 0.125, 1))


def test_the_cpu_backend_takes_it_for_a_bfloat16_cache(monkeypatch):
    H, KVH, D, bs = 8, 4, 64, 16
    contexts = [300, 7, 129, 60]
    _, k, v, table, lens = paged(H, KVH, D, bs, contexts, seed=7, blocks=64)
    # four decode rows then a prefill chunk of 9 tokens (positions 0-8, block 40)
    starts, counts = np.array([c - 1 for c in contexts] + [0]), np.array([1, 1, 1, 1, 9])
    tables = np.zeros((5, table.shape[1]), np.int64)
    tables[:4], tables[4, 0] = table.numpy(), 40
    meta = metadata_from_arrays(starts, counts, tables, bs, None, torch.device("cpu"),
                                with_block_tables=True)
    q = torch.randn(13, H, D, generator=torch.Generator().manual_seed(8)).bfloat16()
    backend = CompiledCpuAttention()
    backend.warm_up(k, v, H, D ** -0.5)
    assert backend.native_decode and backend.wants_block_tables and not backend.compiled
    with torch.inference_mode():
        got = backend.attend(q, k, v, meta, D ** -0.5)
    assert torch.equal(got[:4], cpu_decode.decode_attention(q[:4], k, v, table, lens, D ** -0.5,
                                                            torch.get_num_threads()))
    ref = float32_attention(q[:4], k, v, table, lens)
    assert ((got[:4].float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()
    # (and the prefill chunk beside them is attended)
    prefill = TorchPagedAttention().attend(q.float(), k.float(), v.float(), meta, D ** -0.5)[4:]
    assert ((got[4:].float() - prefill).abs() <= prefill.abs() * 2 ** -7 + 1e-3).all()
    # switched off, or a cache it cannot read (float16): the compiled loops, as before
    monkeypatch.setenv("LLMESH_CPU_DECODE_ATTENTION", "0")
    off = CompiledCpuAttention()
    off.warm_up(k, v, H, D ** -0.5)
    assert not off.native_decode
    monkeypatch.delenv("LLMESH_CPU_DECODE_ATTENTION")
    half = CompiledCpuAttention()
    half.warm_up(k.half(), v.half(), H, D ** -0.5)
    assert not half.native_decode
