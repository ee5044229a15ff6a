"""The CPU prefill attention (kernels/cpu_prefill_attention.h, built by g++ here)
against torch's SDPA on the same bfloat16 inputs, both measured against a
float32 SDPA, and on float32 inputs against a float64 SDPA: causal chunks with
and without earlier context, GQA, head dims, chunks cut mid-block; and the CPU
backends (a 16-bit model's, a float32 model's) taking it for a step's prefills."""
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


@pytest.mark.parametrize("L,C,H,KVH,D", [
    (1, 1, 4, 2, 64), (16, 16, 8, 2, 64), (33, 33, 8, 4, 64), (100, 100, 9, 3, 64),
    (40, 200, 8, 1, 128), (17, 60, 4, 2, 256), (512, 512, 9, 3, 64)])
def test_float32_matches_sdpa_to_float32_rounding(L, C, H, KVH, D):
    g = torch.Generator().manual_seed(L * 1000 + C + 7)
    q, k, v = (torch.randn(n, h, D, generator=g) for n, h in ((L, H), (C, KVH), (C, KVH)))
    scale = D ** -0.5
    truth = sdpa(q.double(), k.double(), v.double(), scale)
    err32 = (sdpa(q, k, v, scale).double() - truth).abs().max().item()
    one = cpu_decode.prefill_attention(q, k, v, scale, 1)
    assert one.dtype == torch.float32
    err = (one.double() - truth).abs().max().item()
    assert err <= max(4 * err32, 2 ** -20 * truth.abs().max().item()), (err, err32)
    # each (KV head, block of rows) is one thread's: the same bits on a team of two
    assert torch.equal(cpu_decode.prefill_attention(q, k, v, scale, 2), one)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_see_exactly_their_prefix(dtype):
    """Changing a key or value after a row's position leaves that row unchanged."""
    L, C, H, KVH, D = 20, 50, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, h, D, generator=g).to(dtype) for n, h in ((L, H), (C, KVH), (C, KVH)))
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
    with pytest.raises(ValueError, match="prefill attention"):  # (types mixed)
        cpu_decode.prefill_attention(q[:4].float(), kv, kv, 1.0, 1)


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


def test_a_float32_models_backend_takes_it_for_prefills(tiny_model):
    from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
    from llmesh.services.executor.attention_cpu import CpuPrefillAttention
    from llmesh.services.executor.runner import ModelRunner
    # (the backend a float32 model's runner picks on this CPU)
    assert type(ModelRunner(tiny_model, 8, 16).backend) is CpuPrefillAttention
    H, KVH, D, bs = 8, 4, 64, 16
    g = torch.Generator().manual_seed(11)
    starts, counts = np.array([0, 45]), np.array([37, 20])
    table = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    meta = metadata_from_arrays(starts, counts, table, bs, None, torch.device("cpu"))
    k_cache, v_cache = (torch.randn(9, bs, KVH, D, generator=g) for _ in "kv")
    q = torch.randn(57, H, D, generator=g)
    backend = CpuPrefillAttention()
    assert backend.native_prefill and not backend.wants_block_tables
    got = backend.attend(q, k_cache, v_cache, meta, D ** -0.5)
    truth = TorchPagedAttention().attend(q.double(), k_cache.double(), v_cache.double(), meta,
                                         D ** -0.5)
    ref32 = TorchPagedAttention().attend(q, k_cache, v_cache, meta, D ** -0.5)
    err, err32 = (got.double() - truth).abs().max().item(), (ref32.double() - truth).abs().max().item()
    assert err <= max(4 * err32, 2 ** -20 * truth.abs().max().item()), (err, err32)


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
