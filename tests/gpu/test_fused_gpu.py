"""Fused elementwise kernels against their torch references (GPU only; tests/gpu/conftest.py
skips them without CUDA). References run in fp32 on the same rounded inputs and round
once, as the kernels do, so what is left is RMSNorm's reduction order (rare one-ulp ties)."""
import pytest
import torch

from llmesh.kernels import fused_ops
from llmesh.kernels.reference import (fused_add_rms_norm_ref, rms_norm_ref, rope_neox_ref,
                               silu_and_mul_ref)

DTYPES = [torch.float16, torch.bfloat16]
TOKENS = [1, 7, 256]
HIDDEN = [64, 100, 2048, 4096]  # 100: not a multiple of 8, the kernels' scalar path
EPS = 1e-6


def _tol(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 2e-3


def _close(out, ref, dtype):
    torch.testing.assert_close(out.float(), ref.float(), rtol=_tol(dtype), atol=_tol(dtype))


def _randn(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).to(dtype)


def _misaligned(t):
    """t's values in a contiguous tensor starting 2 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _rope_tables(head_dim, max_pos=4096, theta=10000.0):
    """model.py rope_tables: cos / sin of (freqs, freqs), float32 [max_pos, head_dim]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    freqs = torch.arange(max_pos, device="cuda").float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_reference(tokens, hidden, dtype):
    torch.manual_seed(tokens * hidden)
    x, w = _randn(tokens, hidden, dtype=dtype, scale=3), 1 + _randn(hidden, dtype=dtype, scale=.1)
    ref = rms_norm_ref(x, w, EPS)
    out = fused_ops.rms_norm(x, w, EPS)
    _close(out, ref, dtype)
    # the HF double rounding reproduced: all but rare reduction-order ties bit-exact
    assert (out == ref).float().mean() > 0.99
    scalar = fused_ops.rms_norm(_misaligned(x), w, EPS)  # another reduction order
    _close(scalar, ref, dtype)
    assert (scalar == out).float().mean() > 0.99
    inplace = x.clone()
    fused_ops.rms_norm(inplace, w, EPS, out=inplace)
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm_matches_reference(tokens, hidden, dtype):
    torch.manual_seed(tokens + hidden)
    x, res = _randn(tokens, hidden, dtype=dtype), _randn(tokens, hidden, dtype=dtype, scale=4)
    w = 1 + _randn(hidden, dtype=dtype, scale=.1)
    x_ref, res_ref = x.clone(), res.clone()
    fused_add_rms_norm_ref(x_ref, res_ref, w, EPS)
    x_out, res_out = x.clone(), res.clone()
    fused_ops.fused_add_rms_norm(x_out, res_out, w, EPS)
    assert torch.equal(res_out, res_ref)  # one rounded add: exact
    _close(x_out, x_ref, dtype)
    assert (x_out == x_ref).float().mean() > 0.99
    x_mis, res_mis = _misaligned(x), _misaligned(res)
    fused_ops.fused_add_rms_norm(x_mis, res_mis, w, EPS)  # scalar path
    assert torch.equal(res_mis, res_out)
    _close(x_mis, x_ref, dtype)
    assert (x_mis == x_out).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8)])
def test_rope_neox_matches_reference(heads, kv_heads, tokens, head_dim, dtype):
    torch.manual_seed(tokens * head_dim + heads)
    cos, sin = _rope_tables(head_dim)
    positions = torch.randint(0, cos.shape[0], (tokens,), device="cuda")
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)  # q | k | v
    width = (heads + kv_heads) * head_dim
    ref = qkv.clone()
    rope_neox_ref(ref, positions, cos, sin, heads + kv_heads, head_dim)
    out = qkv.clone()
    fused_ops.rope_neox_(out, positions, cos, sin, heads + kv_heads, head_dim)
    assert torch.equal(out[:, width:], qkv[:, width:])  # v untouched
    _close(out, ref, dtype)
    # the kernel rounds each fp32 op as torch does (no FMA): the same bits
    assert torch.equal(out, ref)
    # odd row stride (a slice one column into a wider buffer): the scalar path, same values
    buf = torch.zeros(tokens, qkv.shape[1] + 1, dtype=dtype, device="cuda")
    buf[:, 1:] = qkv
    fused_ops.rope_neox_(buf[:, 1:], positions, cos, sin, heads + kv_heads, head_dim)
    assert torch.equal(buf[:, 1:], out) and not buf[:, 0].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 100, 2048, 14336])
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_matches_reference(tokens, inter, dtype):
    torch.manual_seed(tokens + inter)
    x = _randn(tokens, 2 * inter, dtype=dtype, scale=3)
    out = fused_ops.silu_and_mul(x)
    assert out.shape == (tokens, inter)
    ref = silu_and_mul_ref(x)
    _close(out, ref, dtype)
    assert (out == ref).float().mean() > 0.99  # same fp32 formula, one rounding
    given = torch.empty_like(out)
    assert fused_ops.silu_and_mul(_misaligned(x), out=given) is given
    assert torch.equal(given, out)


def test_empty_batches_launch_nothing():
    x = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.ones(64, dtype=torch.bfloat16, device="cuda")
    assert fused_ops.rms_norm(x, w, EPS).shape == (0, 64)
    fused_ops.fused_add_rms_norm(x, x.clone(), w, EPS)
    assert fused_ops.silu_and_mul(x).shape == (0, 32)
    cos, sin = _rope_tables(64, 16)
    fused_ops.rope_neox_(x, torch.empty(0, dtype=torch.int64, device="cuda"), cos, sin, 1, 64)


def _graph_case(name, dtype):
    """(op over static inputs returning the tensors to compare, inputs for a seed)."""
    cos, sin = _rope_tables(128)

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)

        def r(*shape):
            return torch.randn(*shape, generator=g, device="cuda").to(dtype)
        if name == "rms_norm":
            return [r(8, 2048), r(2048)]
        if name == "fused_add_rms_norm":
            return [r(8, 2048), r(8, 2048), r(2048)]
        if name == "rope_neox_":
            return [r(8, 48 * 128),
                    torch.randint(0, 4096, (8,), generator=g, device="cuda")]
        return [r(8, 2 * 1024)]

    ops = {
        "rms_norm": lambda x, w: (fused_ops.rms_norm(x, w, EPS),),
        "fused_add_rms_norm":
            lambda x, r, w: (fused_ops.fused_add_rms_norm(x, r, w, EPS), x, r)[1:],
        "rope_neox_": lambda q, p: (fused_ops.rope_neox_(q, p, cos, sin, 40, 128), q)[1:],
        "silu_and_mul": lambda x: (fused_ops.silu_and_mul(x),),
    }
    return ops[name], inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm", "rope_neox_", "silu_and_mul"])
def test_ops_replay_in_a_cuda_graph(name, dtype):
    op, inputs = _graph_case(name, dtype)
    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the first launch compiles and loads the module
        op(*[t.clone() for t in static])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*static)
    for seed in (1, 2):
        fresh = inputs(seed)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = op(*[f.clone() for f in fresh])
        torch.cuda.synchronize()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want), (name, seed)
