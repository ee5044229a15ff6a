"""CUDA attention backend: the CuPy kernels for decode rows and the cache write;
prefill chunks use SDPA over gathered K/V (the reference path) unless the paged
prefill kernel is switched on (`prefill_kernel`, or LLMESH_CUDA_PREFILL_KERNEL=1): it
is checked on the CPU through an emulation of its CUDA built-ins, and it stays off
by default until tests/gpu has passed with it on a GPU."""
from __future__ import annotations

import os

import torch

from llmesh.services.executor.attention import AttentionMetadata, TorchPagedAttention

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def kernels_support(dtype: torch.dtype, head_dim: int, block_size: int, num_heads: int,
                    num_kv_heads: int, sliding_window: int | None) -> bool:
    from llmesh.kernels.ops import BLOCK_SIZES, HEAD_DIMS
    return (dtype in KERNEL_DTYPES and head_dim in HEAD_DIMS and block_size in BLOCK_SIZES
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8
            and sliding_window is None)


class CudaPagedAttention(TorchPagedAttention):
    """`context_bound` (the longest sequence the engine admits) picks the decode
    kernel's split count, so that an eager step and a CUDA graph captured for any
    context launch the same kernels and give the same bits; None: the step's
    longest context."""

    wants_block_tables = True

    def __init__(self, context_bound: int | None = None, prefill_kernel: bool | None = None):
        super().__init__()
        self.context_bound = context_bound
        if prefill_kernel is None:
            prefill_kernel = os.environ.get("LLMESH_CUDA_PREFILL_KERNEL", "0") == "1"
        self.prefill_kernel = self.wants_prefill_tables = prefill_kernel

    def write_kv(self, k_cache, v_cache, k, v, meta: AttentionMetadata):
        from llmesh.kernels import ops
        ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        from llmesh.kernels import ops
        out = torch.empty_like(q)
        if meta.num_single:
            n = meta.num_single
            out[:n] = ops.paged_decode_attention(
                q[:n], k_cache, v_cache, meta.single_block_tables, meta.single_context_lens,
                scale, max_context=self.context_bound or meta.max_single_context)
        if meta.prefill_block_tables is not None:  # (made only when the kernel is on)
            bounds = meta.prefill_bounds
            ops.paged_prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables,
                                        bounds[0], bounds[1], bounds[2], scale,
                                        max_q_len=meta.max_prefill_len, out=out)
        else:
            self.attend_prefills(q, k_cache, v_cache, meta, scale, out)
        return out
