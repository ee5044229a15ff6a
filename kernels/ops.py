"""Thin wrappers over the CUDA kernels: CuPy RawModule over the `.cu` files,
zero-copy with torch through DLPack, launched on torch's current stream.

CuPy is imported only when a kernel is first used (CPU machines never need it).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).parent
NUM_WARPS = 4
MAX_GROUP = 8
_DTYPE_TAG = {torch.float16: "f16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def _module(name: str):
    import cupy
    return cupy.RawModule(code=(KERNEL_DIR / name).read_text(), options=("-std=c++17",))


def _kernel(module: str, name: str):
    return _module(module).get_function(name)


def _stream():
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def _ptr(t: torch.Tensor):
    """A kernel argument for the tensor's memory (no copy)."""
    import cupy
    return cupy.from_dlpack(t.detach()) if t.numel() else cupy.uint64(0)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split the context (flash-decoding) when too few CTAs would fill the GPU."""
    ctas = num_seqs * num_kv_heads
    if ctas >= num_sms or max_context < 1024:
        return 1
    return max(1, min(math.ceil(max_context / 512), math.ceil(2 * num_sms / ctas)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context: int | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] fp16/bf16; caches [num_blocks, block_size, kvh, head_dim];
    block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if q.dtype not in _DTYPE_TAG or head_dim not in (64, 128) or block_size not in (16, 32) \
            or group > MAX_GROUP or num_heads % num_kv_heads:
        raise ValueError(f"unsupported shape/dtype for paged decode: {q.dtype}, head_dim "
                         f"{head_dim}, block {block_size}, group {group}")
    max_context = max_context or int(context_lens.max())
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, sms)
    tokens_per_split = math.ceil(max_context / num_splits)
    q = q.contiguous()
    out = torch.empty_like(q)
    tag = f"{_DTYPE_TAG[q.dtype]}_d{head_dim}"
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=q.device)
        part_max = torch.empty(num_seqs, num_heads, num_splits, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = torch.empty(0, device=q.device)
    import numpy as np
    with _stream():
        _kernel("paged_attention.cu", f"paged_decode_{tag}_b{block_size}")(
            (num_kv_heads, num_seqs, num_splits), (NUM_WARPS * 32,),
            (_ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), _ptr(q), _ptr(k_cache),
             _ptr(v_cache), _ptr(block_tables), _ptr(context_lens),
             np.int32(block_tables.shape[1]), np.int32(num_kv_heads), np.int32(group),
             np.float32(scale), np.int32(num_splits), np.int32(tokens_per_split)))
        if num_splits > 1:
            _kernel("paged_attention.cu", f"paged_decode_reduce_{tag}")(
                (num_heads, num_seqs), (head_dim,),
                (_ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), np.int32(num_heads),
                 np.int32(num_splits)))
    return out


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Scatter k, v [num_tokens, kvh, d] into the caches at slot_mapping (int64)."""
    import numpy as np
    bits = 16 if k.element_size() == 2 else 32
    row = k.shape[1] * k.shape[2]
    with _stream():
        _kernel("cache_ops.cu", f"reshape_and_cache_{bits}")(
            (k.shape[0],), (min(1024, row),),
            (_ptr(k.contiguous()), _ptr(v.contiguous()), _ptr(k_cache), _ptr(v_cache),
             _ptr(slot_mapping), np.int32(row)))


def copy_blocks(cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """pairs: [num_pairs, 2] int64 (src, dst) on the cache's device."""
    import numpy as np
    if not pairs.numel():
        return
    bits = 16 if cache.element_size() == 2 else 32
    with _stream():
        _kernel("cache_ops.cu", f"copy_blocks_{bits}")(
            (pairs.shape[0],), (256,), (_ptr(cache), _ptr(pairs), np.int64(cache[0].numel())))
