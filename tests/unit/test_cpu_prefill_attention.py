"""The CPU prefill attention (kernels/cpu_prefill_attention.h, built by g++ here)
against torch's SDPA on the same bfloat16 inputs, both measured against a
float32 SDPA: causal chunks with and without earlier context, GQA, head dims,
chunks cut mid-block; and the CPU backend taking it for a step's prefills."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmesh.kernels import cpu_decode

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU kernels: {cpu_decode.unavailable()}")


def sdpa(q, k, v, scale):
    """[L, H, D] queries at the end of [C, KVH, D] keys, causal from the right."""
    L, C = q.shape[0], k.shape[0]
    visible = torch.arange(C)[None, :] <= (C - L + torch.arange(L))[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=visible, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize("L,C,H,KVH,D", [
    (1, 1, 4, 2, 64), (7, 7, 4, 4, 32), (16, 16, 8, 2, 64), (33, 33, 8, 4, 64),
    (100, 100, 9, 3, 64), (40, 200, 8, 1, 128), (17, 60, 4, 2, 256), (512, 512, 8, 4, 64)])
def test_matches_sdpa_as_closely_as_bfloat16_sdpa(L, C, H, KVH, D):
    g = torch.Generator().manual_seed(L * 1000 + C)
    q, k, v = (torch.randn(n, h, D, generator=g).bfloat16() for n, h in ((L, H), (C, KVH), (C, KVH)))
    scale = D ** -0.5
    truth = sdpa(q.float(), k.float(), v.float(), scale)
    ref16 = sdpa(q, k, v, scale).float()
    for threads in (1, 2):
        got = cpu_decode.prefill_attention(q, k, v, scale, threads).float()
        err, err16 = (got - truth).abs().max().item(), (ref16 - truth).abs().max().item()
        assert err <= max(1.5 * err16, 2 ** -8 * truth.abs().max().item()), (threads, err, err16)


def test_rows_see_exactly_their_prefix():
    """Changing a key or value after a row's position leaves that row unchanged."""
    L, C, H, KVH, D = 20, 50, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, h, D, generator=g).bfloat16() for n, h in ((L, H), (C, KVH), (C, KVH)))
    base = cpu_decode.prefill_attention(q, k, v, 0.125, 2)
    k2, v2 = k.clone(), v.clone()
    k2[C - L + 10:] += 3
    v2[C - L + 10:] -= 2
    moved = cpu_decode.prefill_attention(q, k2, v2, 0.125, 2)
    assert torch.equal(moved[:10], base[:10])
    assert not torch.equal(moved[10:], base[10:])


def test_what_it_refuses():
    q = torch.zeros(4, 4, 48, dtype=torch.bfloat16)
    kv = torch.zeros(4, 2, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="prefill attention"):
        cpu_decode.prefill_attention(q, kv, kv, 1.0, 1)  # head_dim 48
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    kv = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="prefill attention"):
        cpu_decode.prefill_attention(q, kv, kv, 1.0, 1)  # more queries than keys
    with pytest.raises(ValueError, match="prefill attention"):
        cpu_decode.prefill_attention(q.half(), kv.half(), kv.half(), 1.0, 1)


def test_the_cpu_backend_takes_it_for_prefills():
    from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
    from llmesh.services.executor.attention_cpu import CompiledCpuAttention
    H, KVH, D, bs = 8, 4, 64, 16
    g = torch.Generator().manual_seed(9)
    # two prefill chunks: a fresh 37-token prompt, and 20 tokens after 45 cached ones
    starts, counts = np.array([0, 45]), np.array([37, 20])
    table = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    meta = metadata_from_arrays(starts, counts, table, bs, None, torch.device("cpu"),
                                with_block_tables=True)
    k_cache, v_cache = (torch.randn(9, bs, KVH, D, generator=g).bfloat16() for _ in "kv")
    q = torch.randn(57, H, D, generator=g).bfloat16()
    backend = CompiledCpuAttention()
    assert backend.native_prefill
    got = backend.attend(q, k_cache, v_cache, meta, D ** -0.5).float()
    ref = TorchPagedAttention().attend(q.float(), k_cache.float(), v_cache.float(), meta, D ** -0.5)
    ref16 = TorchPagedAttention().attend(q, k_cache, v_cache, meta, D ** -0.5).float()
    err, err16 = (got - ref).abs().max().item(), (ref16 - ref).abs().max().item()
    assert err <= max(1.5 * err16, 2 ** -8 * ref.abs().max().item()), (err, err16)


def test_a_failed_build_keeps_torchs_attention(monkeypatch, tmp_path):
    """No library (the compiler fails): the backend says so and attends as the
    reference does, bit for bit."""
    from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
    from llmesh.services.executor.attention_cpu import CompiledCpuAttention
    monkeypatch.setattr(cpu_decode, "_library", None)  # (none loaded in this process yet)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    monkeypatch.setenv("LLMESH_CACHE_DIR", str(tmp_path))  # and nothing built before
    backend = CompiledCpuAttention()
    assert not backend.native_prefill
    g = torch.Generator().manual_seed(3)
    meta = metadata_from_arrays(np.array([0]), np.array([30]), np.array([[1, 2]]), 16, None,
                                torch.device("cpu"), with_block_tables=True)
    k_cache, v_cache = (torch.randn(3, 16, 2, 64, generator=g).bfloat16() for _ in "kv")
    q = torch.randn(30, 4, 64, generator=g).bfloat16()
    assert torch.equal(backend.attend(q, k_cache, v_cache, meta, 0.125),
                       TorchPagedAttention().attend(q, k_cache, v_cache, meta, 0.125))
