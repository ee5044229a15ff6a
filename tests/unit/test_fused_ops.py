"""The fused-op wrappers check their arguments before anything reaches a GPU (CPU
tensors here, where no kernel runs), and their torch references, the GPU tests'
oracle, agree with the model's own modules."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmesh.kernels import fused_ops
from llmesh.kernels.reference import (fused_add_rms_norm_ref, rms_norm_ref, rope_neox_ref,
                               silu_and_mul_ref)
from llmesh.services.executor.model import MLP, RMSNorm, apply_rope, rope_tables

BF16, F16 = torch.bfloat16, torch.float16


def _z(*shape, dtype=BF16):
    return torch.zeros(*shape, dtype=dtype)


def _strided(*shape, dtype=BF16):
    return _z(*reversed(shape), dtype=dtype).t()  # right shape, not contiguous


@pytest.mark.parametrize("args,needle", [
    ((_z(4, 64, dtype=torch.float32), _z(64, dtype=torch.float32)), "x must be fp16 or bf16"),
    ((_z(4, 64), _z(32)), r"weight must be \[64\]"),
    ((_z(4, 64), _z(64, dtype=F16)), "weight must share x's dtype"),
    ((_strided(4, 64), _z(64)), "x must be contiguous"),
    ((_z(4, 64), _z(128)[::2]), "weight must be contiguous"),
    ((_z(4, 0), _z(0)), "non-empty last dimension"),
    ((_z(4, 64), _z(64), _z(4, 32)), r"out must be \(4, 64\)"),
    ((_z(4, 64), _z(64), _strided(4, 64)), "out must be contiguous"),
    ((_z(4, 64), _z(64)), "same CUDA device"),  # right in every way but the device
], ids=["fp32", "weight-size", "weight-dtype", "strided", "weight-strided", "empty", "out-shape",
        "out-strided", "cpu"])
def test_rms_norm_arguments_are_checked(args, needle):
    with pytest.raises(ValueError, match=needle):
        fused_ops.rms_norm(*args[:2], 1e-6, *args[2:])


@pytest.mark.parametrize("args,needle", [
    ((_z(4, 64, dtype=F16), _z(4, 64), _z(64)), "share shape and dtype"),
    ((_z(4, 64), _z(3, 64), _z(64)), "share shape and dtype"),
    ((_z(4, 64), _strided(4, 64), _z(64)), "residual must be contiguous"),
    ((_z(4, 64), _z(4, 64), _z(63)), r"weight must be \[64\]"),
    ((_z(4, 64), _z(4, 64), _z(64)), "same CUDA device"),
], ids=["dtype", "shape", "strided", "weight", "cpu"])
def test_fused_add_rms_norm_arguments_are_checked(args, needle):
    with pytest.raises(ValueError, match=needle):
        fused_ops.fused_add_rms_norm(*args, 1e-6)


def test_fused_add_rms_norm_refuses_one_buffer_for_both():
    x = _z(4, 64)
    with pytest.raises(ValueError, match="different tensors"):
        fused_ops.fused_add_rms_norm(x, x, _z(64), 1e-6)


def _rope_args(**over):
    a = dict(qkv=_z(3, 48 * 64), positions=torch.zeros(3, dtype=torch.int64),
             cos=torch.zeros(100, 64), sin=torch.zeros(100, 64), num_heads=40, head_dim=64)
    a.update(over)
    return a


@pytest.mark.parametrize("over,needle", [
    (dict(qkv=torch.zeros(3, 48 * 64)), "fp16 or bf16"),
    (dict(qkv=_z(3, 8, 64)), "2-D"),
    (dict(qkv=_strided(3, 48 * 64)), "columns must be contiguous"),
    (dict(head_dim=63), "positive and even"),
    (dict(num_heads=49), "need 3136 columns; qkv has 3072"),
    (dict(qkv=_z(3, 48 * 64).as_strided((3, 48 * 64), (64, 1))), "rows overlap"),
    (dict(positions=torch.zeros(3, dtype=torch.int32)),
     r"positions must be contiguous int64 \[3\]"),
    (dict(positions=torch.zeros(4, dtype=torch.int64)), r"int64 \[3\]"),
    (dict(cos=torch.zeros(100, 64, dtype=BF16)), "cos and sin must be float32"),
    (dict(sin=torch.zeros(100, 128)), r"float32 \[max_positions, 64\]"),
    (dict(cos=torch.zeros(64, 100).t()), "cos and sin must be contiguous"),
    (dict(), "same CUDA device"),
], ids=["fp32", "3d", "strided", "odd-dim", "too-wide", "overlap", "pos-int32", "pos-len",
        "cos-bf16", "sin-shape", "cos-strided", "cpu"])
def test_rope_arguments_are_checked(over, needle):
    with pytest.raises(ValueError, match=needle):
        fused_ops.rope_neox_(**_rope_args(**over))


def test_rope_accepts_a_strided_qkv_slice_up_to_the_device_check():
    """The q+k columns of a wider row are fine (stride(0) > width): only the device fails."""
    qkv = _z(3, 4 * 48 * 64)[:, :48 * 64]
    with pytest.raises(ValueError, match="same CUDA device"):
        fused_ops.rope_neox_(**_rope_args(qkv=qkv))


@pytest.mark.parametrize("args,needle", [
    ((_z(4, 64, dtype=torch.float32),), "fp16 or bf16"),
    ((_z(4, 63),), "must be even"),
    ((_strided(4, 64),), "x must be contiguous"),
    ((_z(4, 64), _z(4, 64)), r"out must be \(4, 32\)"),
    ((_z(4, 64), _z(4, 32, dtype=F16)), r"out must be \(4, 32\) torch.bfloat16"),
    ((_z(4, 64), _strided(4, 32)), "out must be contiguous"),
    ((_z(4, 64),), "same CUDA device"),
], ids=["fp32", "odd", "strided", "out-shape", "out-dtype", "out-strided", "cpu"])
def test_silu_and_mul_arguments_are_checked(args, needle):
    with pytest.raises(ValueError, match=needle):
        fused_ops.silu_and_mul(*args)


# --- the references against services/executor/model.py -----------------------------------

def _norm(hidden, dtype, seed=0):
    torch.manual_seed(seed)
    norm = RMSNorm(hidden, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, BF16, F16])
def test_rms_norm_ref_is_the_model_rmsnorm(dtype):
    norm = _norm(256, dtype)
    x = (3 * torch.randn(5, 256)).to(dtype)
    ref, model = rms_norm_ref(x, norm.weight.detach(), norm.eps), norm(x).detach()
    assert ref.dtype == model.dtype == dtype
    if dtype == torch.float32:  # the model's fused F.rms_norm: same math, other op order
        torch.testing.assert_close(ref, model, rtol=1e-5, atol=1e-5)
    else:  # the half-precision branch is the reference's own math: bit for bit
        assert torch.equal(ref, model)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_fused_add_rms_norm_ref_is_the_decoder_layers_residual_step(dtype):
    norm = _norm(128, dtype, seed=1)
    h, attn_out = torch.randn(6, 128).to(dtype), torch.randn(6, 128).to(dtype)
    want_h = h + attn_out  # DecoderLayer: x = x + self_attn(...); then the post-attn norm
    want_y = norm(want_h).detach()
    x, residual = attn_out.clone(), h.clone()
    fused_add_rms_norm_ref(x, residual, norm.weight.detach(), norm.eps)
    assert torch.equal(residual, want_h)
    torch.testing.assert_close(x, want_y, rtol=1e-5, atol=1e-5)


def _tables(head_dim, max_pos=512):
    config = SimpleNamespace(head_dim=head_dim, rope_theta=10000.0, rope_scaling=None,
                             max_position_embeddings=max_pos)
    return rope_tables(config, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_neox_ref_is_the_model_apply_rope(dtype, head_dim):
    torch.manual_seed(2)
    cos, sin = _tables(head_dim)
    heads, kv_heads, tokens = 4, 2, 7
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([0, 1, 5, 99, 300, 511, 2])
    width = (heads + kv_heads) * head_dim
    # Attention.forward's one-pass rotation of the q and k heads (tables cast to the dtype)
    want = apply_rope(qkv[:, :width].view(tokens, heads + kv_heads, head_dim),
                      cos[positions].to(dtype).unsqueeze(1), sin[positions].to(dtype).unsqueeze(1))
    got = qkv.clone()
    rope_neox_ref(got, positions, cos, sin, heads + kv_heads, head_dim)
    assert torch.equal(got[:, width:], qkv[:, width:])  # v untouched
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the model rounds every op
    torch.testing.assert_close(got[:, :width].float(), want.reshape(tokens, width).float(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_silu_and_mul_ref_is_the_model_mlp(dtype):
    torch.manual_seed(3)
    mlp = MLP(SimpleNamespace(hidden_size=32, intermediate_size=48))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    mlp = mlp.to(dtype)
    x = torch.randn(5, 32).to(dtype)
    with torch.no_grad():
        want = mlp(x)
        got = mlp.down_proj(silu_and_mul_ref(mlp.gate_up_proj(x)))
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        direct = F.silu(gate) * up
    if dtype == torch.float32:
        assert torch.equal(got, want)
        assert torch.equal(silu_and_mul_ref(torch.cat((gate, up), -1)), direct)
    else:  # the model rounds silu and the product separately: one bf16 ulp apart at most
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(silu_and_mul_ref(torch.cat((gate, up), -1)), direct,
                                   rtol=1.6e-2, atol=1e-2)
