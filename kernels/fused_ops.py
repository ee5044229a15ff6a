"""Wrappers over kernels/fused.cu: RMSNorm, residual add + RMSNorm, NeoX RoPE and
SiLU-and-mul for fp16 / bf16 activations.

Written like kernels/ops.py (whose cached module, stream and pointer helpers they
reuse): arguments are checked first, on any device, so a mistake is a clear
ValueError even on CPU; the CUDA-device check comes last so a CPU test reaches
every other message. CuPy is imported only at launch. A launch allocates nothing
but the returned output and never syncs with the host, so every op can be
captured in a CUDA graph (warm it up once first: the first launch compiles).
"""
from __future__ import annotations

import torch

from llmesh.kernels.ops import _DTYPE_TAG, _check, _kernel, _ptr, _stream

MODULE = "fused.cu"
VEC = 8  # elements per 16-byte load in the kernels
MAX_THREADS = 1024  # the kernels' __launch_bounds__
SILU_THREADS = 256
MAX_GRID_Y = 65535


def _threads(items: int, cap: int = MAX_THREADS) -> int:
    """A whole number of warps (the block reduction assumes it), one item each up to cap."""
    return max(32, min(cap, -(-items // 32) * 32))


def _items(n: int) -> int:
    """Work items over n elements: 16-byte packs where n allows (as the kernels choose)."""
    return n // VEC if n % VEC == 0 else n


def _check_act(op: str, name: str, t: torch.Tensor) -> None:
    _check(t.dtype in _DTYPE_TAG, f"{op}: {name} must be fp16 or bf16; got {t.dtype}")
    _check(t.dim() >= 1 and t.shape[-1] > 0,
           f"{op}: {name} must have a non-empty last dimension; got {tuple(t.shape)}")
    _check(t.is_contiguous(), f"{op}: {name} must be contiguous")


def _check_weight(op: str, weight: torch.Tensor, x: torch.Tensor) -> None:
    hidden = x.shape[-1]
    _check(tuple(weight.shape) == (hidden,),
           f"{op}: weight must be [{hidden}] (x's last dimension); got {tuple(weight.shape)}")
    _check(weight.dtype == x.dtype,
           f"{op}: weight must share x's dtype {x.dtype}; got {weight.dtype}")
    _check(weight.is_contiguous(), f"{op}: weight must be contiguous")


def _check_out(op: str, out: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    _check(tuple(out.shape) == tuple(shape) and out.dtype == dtype,
           f"{op}: out must be {tuple(shape)} {dtype}; got {tuple(out.shape)} {out.dtype}")
    _check(out.is_contiguous(), f"{op}: out must be contiguous")


def _check_device(op: str, first: torch.Tensor, *rest: torch.Tensor) -> None:
    _check(first.is_cuda and all(t.device == first.device for t in rest),
           f"{op}: every tensor must be on the same CUDA device; got "
           f"{', '.join(str(t.device) for t in (first, *rest))}")


def check_rms_norm_args(x, weight, out=None) -> None:
    _check_act("rms_norm", "x", x)
    _check_weight("rms_norm", weight, x)
    if out is not None:
        _check_out("rms_norm", out, x.shape, x.dtype)
    _check_device("rms_norm", x, weight, *(() if out is None else (out,)))


def check_fused_add_rms_norm_args(x, residual, weight) -> None:
    op = "fused_add_rms_norm"
    _check_act(op, "x", x)
    _check_act(op, "residual", residual)
    _check(x.shape == residual.shape and x.dtype == residual.dtype,
           f"{op}: x and residual must share shape and dtype; got {tuple(x.shape)} {x.dtype} "
           f"and {tuple(residual.shape)} {residual.dtype}")
    # both are written: one buffer for both would make the result depend on timing
    _check(x.numel() == 0 or x.data_ptr() != residual.data_ptr(),
           f"{op}: x and residual must be different tensors")
    _check_weight(op, weight, x)
    _check_device(op, x, residual, weight)


def check_rope_args(qkv, positions, cos, sin, num_heads: int, head_dim: int) -> None:
    op = "rope_neox_"
    _check(qkv.dim() == 2 and qkv.dtype in _DTYPE_TAG,
           f"{op}: qkv must be a 2-D fp16 or bf16 [tokens, columns] tensor; got "
           f"{tuple(qkv.shape)} {qkv.dtype}")
    _check(qkv.stride(1) == 1, f"{op}: qkv's columns must be contiguous (stride(1) == 1); "
           f"got strides {qkv.stride()}")
    _check(num_heads > 0 and head_dim > 0 and head_dim % 2 == 0,
           f"{op}: num_heads must be positive and head_dim positive and even; got "
           f"{num_heads}, {head_dim}")
    width = num_heads * head_dim
    _check(width <= qkv.shape[1],
           f"{op}: {num_heads} heads of {head_dim} need {width} columns; qkv has {qkv.shape[1]}")
    _check(qkv.shape[0] <= 1 or qkv.stride(0) >= width,
           f"{op}: qkv's rows overlap (stride(0) {qkv.stride(0)} < {width})")
    _check(positions.dtype == torch.int64 and tuple(positions.shape) == (qkv.shape[0],)
           and positions.is_contiguous(),
           f"{op}: positions must be contiguous int64 [{qkv.shape[0]}]; got "
           f"{tuple(positions.shape)} {positions.dtype}")
    _check(cos.dtype == sin.dtype == torch.float32 and cos.dim() == 2 and cos.shape == sin.shape
           and cos.shape[1] == head_dim,
           f"{op}: cos and sin must be float32 [max_positions, {head_dim}]; got "
           f"{tuple(cos.shape)} {cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    _check(cos.is_contiguous() and sin.is_contiguous(), f"{op}: cos and sin must be contiguous")
    _check_device(op, qkv, positions, cos, sin)


def check_silu_and_mul_args(x, out=None) -> None:
    _check_act("silu_and_mul", "x", x)
    _check(x.shape[-1] % 2 == 0,
           f"silu_and_mul: x's last dimension must be even ([gate | up]); got {x.shape[-1]}")
    if out is not None:
        _check_out("silu_and_mul", out, (*x.shape[:-1], x.shape[-1] // 2), x.dtype)
    _check_device("silu_and_mul", x, *(() if out is None else (out,)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over x's last dimension, rounded as HF's half-precision RMSNorm.
    `out` may be x itself (normalise in place)."""
    import numpy as np
    check_rms_norm_args(x, weight, out)
    hidden = x.shape[-1]
    out = torch.empty_like(x) if out is None else out
    rows = x.numel() // hidden
    if rows:
        with _stream():
            _kernel(MODULE, f"rms_norm_{_DTYPE_TAG[x.dtype]}")(
                (rows,), (_threads(_items(hidden)),),
                (_ptr(out), _ptr(x), _ptr(weight), np.float32(eps), np.int32(hidden)))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: residual = residual + x (in the dtype), then x = rms_norm(residual)."""
    import numpy as np
    check_fused_add_rms_norm_args(x, residual, weight)
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    if rows:
        with _stream():
            _kernel(MODULE, f"fused_add_rms_norm_{_DTYPE_TAG[x.dtype]}")(
                (rows,), (_threads(_items(hidden)),),
                (_ptr(x), _ptr(residual), _ptr(weight), np.float32(eps), np.int32(hidden)))


def rope_neox_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first num_heads * head_dim columns of each row of qkv (q heads
    then k heads; the v columns after them are untouched) at positions[token]. Positions
    must lie inside the tables (not checked: that would need a host sync)."""
    import numpy as np
    check_rope_args(qkv, positions, cos, sin, num_heads, head_dim)
    if qkv.shape[0]:
        half = head_dim // 2
        with _stream():
            _kernel(MODULE, f"rope_neox_{_DTYPE_TAG[qkv.dtype]}")(
                (qkv.shape[0],), (_threads(num_heads * _items(half)),),
                (_ptr(qkv), np.int64(qkv.stride(0)), _ptr(positions), _ptr(cos), _ptr(sin),
                 np.int32(num_heads), np.int32(head_dim)))


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x = [..., 2 * inter] (gate then up) -> silu(gate) * up, [..., inter]."""
    import numpy as np
    check_silu_and_mul_args(x, out)
    inter = x.shape[-1] // 2
    if out is None:
        out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    rows = x.numel() // x.shape[-1]
    if rows:
        threads = _threads(_items(inter), SILU_THREADS)
        chunks = min(MAX_GRID_Y, -(-_items(inter) // threads))
        with _stream():
            _kernel(MODULE, f"silu_and_mul_{_DTYPE_TAG[x.dtype]}")(
                (rows, chunks), (threads,), (_ptr(out), _ptr(x), np.int32(inter)))
    return out
