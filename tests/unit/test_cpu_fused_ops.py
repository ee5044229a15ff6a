"""The eager bfloat16 forward's element-wise steps in C++ (kernels/cpu_fused_ops.h):
each against the torch ops it replaces (RoPE and the residual add bit for bit, the
norm and SiLU to the last bfloat16 bit), in place where the CUDA ones are, what they
refuse, and the model taking them for bfloat16 on a CPU only."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmesh.kernels import cpu_decode, cpu_fused_ops
from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
from llmesh.services.executor.model import apply_rope, fused_ops_for, rope_tables
from llmesh.services.executor.model_config import parse_model_config

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU kernels: {cpu_decode.unavailable()}")
G = torch.Generator().manual_seed(0)


def half_norm(x, w, eps=1e-5):  # the model's half-precision RMSNorm
    return w * F.rms_norm(x.float(), w.shape, None, eps).to(torch.bfloat16)


def within_a_bit(got, want):
    """Equal but for an occasional last-bit difference (a float32 sum's order at a tie)."""
    step = want.float().abs() * 2 ** -7 + 1e-30
    return ((got.float() - want.float()).abs() <= step).all() and (got == want).float().mean() > 0.99


@pytest.mark.parametrize("rows,width", [(1, 64), (37, 512), (300, 576)])
def test_norms_and_the_residual_add(rows, width):
    x = (torch.randn(rows, width, generator=G) * 3).bfloat16()
    r = torch.randn(rows, width, generator=G).bfloat16()
    w = (1 + 0.1 * torch.randn(width, generator=G)).bfloat16()
    assert within_a_bit(cpu_fused_ops.rms_norm(x, w, 1e-5), half_norm(x, w))
    x2, r2 = x.clone(), r.clone()
    cpu_fused_ops.fused_add_rms_norm(x2, r2, w, 1e-5)  # (in place, as the CUDA op)
    assert torch.equal(r2, x + r)
    assert within_a_bit(x2, half_norm(x + r, w))
    out = x.clone()
    assert cpu_fused_ops.rms_norm(out, w, 1e-5, out=out) is out and torch.equal(
        out, cpu_fused_ops.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 64), (9, 3, 64), (4, 2, 128), (2, 1, 32)])
def test_rope_is_the_torch_ops_bit_for_bit_and_leaves_the_values(heads, kv_heads, head_dim):
    config = parse_model_config(dict(architectures=["LlamaForCausalLM"], hidden_size=heads * head_dim,
                                     intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=heads, num_key_value_heads=kv_heads,
                                     head_dim=head_dim, vocab_size=32, max_position_embeddings=4096))
    cos, sin = rope_tables(config, torch.device("cpu"))
    n, rotated = 23, (heads + kv_heads) * head_dim
    qkv = torch.randn(n, rotated + kv_heads * head_dim, generator=G).bfloat16()
    pos = torch.randint(0, 4096, (n,), generator=G)
    want = apply_rope(qkv[:, :rotated].view(n, heads + kv_heads, head_dim),
                      cos[pos].bfloat16().unsqueeze(1), sin[pos].bfloat16().unsqueeze(1))
    got = qkv.clone()
    cpu_fused_ops.rope_neox_(got, pos, cos, sin, heads + kv_heads, head_dim)
    assert torch.equal(got[:, :rotated].view(n, heads + kv_heads, head_dim), want)
    assert torch.equal(got[:, rotated:], qkv[:, rotated:])


@pytest.mark.parametrize("rows,inter", [(1, 16), (37, 1536)])
def test_silu_and_mul(rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=G) * 2).bfloat16()
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert within_a_bit(cpu_fused_ops.silu_and_mul(gate_up), want)


def test_what_they_refuse():
    cos, sin = torch.zeros(16, 64), torch.zeros(16, 64)
    qkv = torch.randn(2, 3 * 64).bfloat16()
    before = qkv.clone()
    with pytest.raises(ValueError, match="outside its tables"):
        cpu_fused_ops.rope_neox_(qkv, torch.tensor([3, 16]), cos, sin, 2, 64)
    assert torch.equal(qkv, before)  # (refused before anything was written)
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        cpu_fused_ops.rope_neox_(qkv, torch.tensor([0, 1]), cos[:, :16], sin[:, :16], 2, 16)
    with pytest.raises(ValueError, match="bfloat16 rows"):
        cpu_fused_ops.rms_norm(qkv.float(), torch.ones(192).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        cpu_fused_ops.rms_norm(qkv, torch.ones(64).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_fused_ops.silu_and_mul(torch.zeros(2, 20).bfloat16())


def test_the_model_takes_them_for_bfloat16_on_a_cpu_only(monkeypatch):
    """A random bfloat16 model's prefill and decode forward with the C++ ops against
    the same with torch's (switched off): the same hidden states but for a last bit
    here and there; float32 activations and widths they do not take keep torch's."""
    from unit.test_cpu_decode_kernel import caches, random_model
    assert fused_ops_for(torch.zeros(2, 64).bfloat16()) is cpu_fused_ops
    assert fused_ops_for(torch.zeros(2, 64)) is None  # float32: torch's (the reference)
    assert fused_ops_for(torch.zeros(2, 64).bfloat16(), cpu_fits=False) is None
    assert fused_ops_for(torch.zeros(2, 3, 64).bfloat16()) is None
    model = random_model(num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    starts, counts = np.array([40, 0, 0]), np.array([1, 30, 17])  # a decode row, two prefills
    table = np.array([[5, 6, 7], [1, 2, 0], [3, 4, 0]])

    def forward():
        kv = caches(model, 8, torch.bfloat16)
        meta = metadata_from_arrays(starts, counts, table, 16, None, torch.device("cpu"))
        ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return model(ids, meta.positions, kv, meta, TorchPagedAttention()), kv

    fused, kv_fused = forward()
    monkeypatch.setenv("LLMESH_CPU_FUSED_OPS", "0")
    cpu_fused_ops._enabled.cache_clear()
    try:
        assert fused_ops_for(torch.zeros(2, 64).bfloat16()) is None
        eager, kv_eager = forward()
    finally:
        monkeypatch.delenv("LLMESH_CPU_FUSED_OPS")
        cpu_fused_ops._enabled.cache_clear()
    assert within_a_bit(fused, eager)
    assert all(within_a_bit(a, b) for (k1, v1), (k2, v2) in zip(kv_fused, kv_eager)
               for a, b in ((k1, k2), (v1, v2)))
