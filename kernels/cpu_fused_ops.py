"""The eager bfloat16 forward's element-wise steps on a CPU (kernels/cpu_fused_ops.h,
built into the CPU decode kernel's library): RMSNorm, the residual add with the
norm after it, NeoX RoPE and SiLU-and-mul, with the same names, arguments and
in-place behaviour as the CUDA ones (fused_ops.py), so the model calls either.

Each is one pass over its rows, rounded to bfloat16 where the torch ops it
replaces round (the whole-forward kernel's helpers), rows split over torch's
thread count; torch runs 3-8 ops for each, about a fifth of a 49-row decode step
and a tenth of a 512-token prefill of the bench model. Results may differ from
torch's in the last bfloat16 bit where a float32 sum's order (the norm's) or
exp's last bit (SiLU's) lands on a rounding tie. Used for bfloat16 activations
on a CPU with AVX512-BF16 and a C++ compiler, for widths the helpers take
(`fits`); `LLMESH_CPU_FUSED_OPS=0` keeps torch's ops.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from llmesh.kernels import cpu_decode

log = logging.getLogger("llmesh.executor")


@functools.lru_cache(maxsize=1)
def _enabled() -> bool:
    if os.environ.get("LLMESH_CPU_FUSED_OPS", "1") == "0" or cpu_decode.unavailable():
        return False
    try:
        cpu_decode.library()
    except (RuntimeError, OSError) as e:  # (a failed build: torch's ops, said once)
        log.warning("element-wise ops: torch's (the C++ kernel: %s)", str(e)[:300])
        return False
    return True


def usable(x: torch.Tensor) -> bool:
    """bfloat16 activations on a CPU whose library is built (and not switched off)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and _enabled()


def fits(hidden: int, inter: int, head_dim: int) -> bool:
    """Whether the helpers take a model of these widths."""
    return hidden % 16 == 0 and inter % 16 == 0 and head_dim % 32 == 0 and head_dim <= 256


def _rows(name: str, x: torch.Tensor, width: int) -> int:
    if x.dim() != 2 or x.shape[1] != width or not x.is_contiguous() or x.dtype != torch.bfloat16:
        raise ValueError(f"{name} takes contiguous [rows, {width}] bfloat16 rows, "
                         f"not {tuple(x.shape)} {x.dtype}")
    return x.shape[0]


def _weight(name: str, weight: torch.Tensor, width: int) -> None:
    if weight.shape != (width,) or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        raise ValueError(f"{name}'s weight is not [{width}] bfloat16")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row, rounded as the half-precision RMSNorm; `out` may be x."""
    width = x.shape[-1]
    n = _rows("rms_norm", x, width)
    _weight("rms_norm", weight, width)
    out = torch.empty_like(x) if out is None else out
    _rows("rms_norm's out", out, width)
    cpu_decode.library().llmesh_cpu_rms_norm(x.data_ptr(), None, weight.data_ptr(), n, width, eps,
                                             out.data_ptr(), torch.get_num_threads())
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: residual = residual + x (rounded to bfloat16), then x = rms_norm(residual)."""
    width = x.shape[-1]
    n = _rows("fused_add_rms_norm", x, width)
    if _rows("fused_add_rms_norm's residual", residual, width) != n:
        raise ValueError("fused_add_rms_norm's x and residual differ in rows")
    _weight("fused_add_rms_norm", weight, width)
    cpu_decode.library().llmesh_cpu_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                             n, width, eps, x.data_ptr(), torch.get_num_threads())


def rope_neox_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first num_heads * head_dim columns of each row of qkv at
    positions[row] (float32 tables [positions, head_dim]; a position outside them is
    refused before anything is written)."""
    if qkv.dim() != 2 or qkv.dtype != torch.bfloat16 or qkv.stride(1) != 1 \
            or qkv.shape[1] < num_heads * head_dim or head_dim % 32 or head_dim > 256:
        raise ValueError("rope_neox_ takes [rows, >= heads * head_dim] bfloat16 rows with unit "
                         "column stride and head_dim a multiple of 32 up to 256")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim \
            or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rope_neox_'s tables are not contiguous float32 [positions, {head_dim}]")
    positions = positions.to(torch.int64).contiguous()
    if positions.shape != (qkv.shape[0],):
        raise ValueError("rope_neox_ needs one position per row")
    code = cpu_decode.library().llmesh_cpu_rope(
        qkv.data_ptr(), qkv.shape[0], qkv.stride(0), positions.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), cos.shape[0], num_heads, head_dim, torch.get_num_threads())
    if code:
        raise ValueError("rope_neox_'s positions lie outside its tables")


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x = [rows, 2 * inter] (gate then up) -> silu(gate) * up, [rows, inter]."""
    inter = x.shape[-1] // 2
    n = _rows("silu_and_mul", x, 2 * inter)
    if inter % 16:
        raise ValueError(f"silu_and_mul takes an intermediate width that is a multiple of 16, "
                         f"not {inter}")
    out = torch.empty(n, inter, dtype=x.dtype) if out is None else out
    _rows("silu_and_mul's out", out, inter)
    cpu_decode.library().llmesh_cpu_silu_and_mul(x.data_ptr(), n, inter, out.data_ptr(),
                                                 torch.get_num_threads())
    return out
