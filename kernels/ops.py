"""Thin wrappers over the CUDA kernels: CuPy RawModule over the `.cu` files,
launched on torch's current stream with raw device pointers (no per-argument
DLPack conversion; module, functions, streams and SM counts are cached).

Arguments are checked first, on any device, so a wrong shape, dtype or device
is a clear ValueError (unit-tested on CPU). CuPy is imported only when a kernel
is first launched (CPU machines never need it).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).parent
NUM_THREADS = 128  # the decode kernel's CTA (paged_attention.cu)
PREFILL_THREADS, PREFILL_ROWS, PREFILL_PAD = 128, 64, 8  # paged_prefill.cu's CTA
MAX_GROUP = 8
GROUP_KERNELS = (1, 2, 4, 8)  # each kernel serves GQA groups up to its size
HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64)
_DTYPE_TAG = {torch.float16: "f16", torch.bfloat16: "bf16"}
NVRTC_OPTIONS = ["-std=c++17"]  # what CuPy's NVRTC gets (the CPU compile test uses the same)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    import cupy
    return cupy.RawModule(code=(KERNEL_DIR / name).read_text(), options=tuple(NVRTC_OPTIONS))


@functools.lru_cache(maxsize=None)
def _kernel(module: str, name: str):
    return _module(module).get_function(name)


@functools.lru_cache(maxsize=None)
def _external_stream(handle: int):
    import cupy
    return cupy.cuda.ExternalStream(handle)


def _stream():
    return _external_stream(torch.cuda.current_stream().cuda_stream)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _ptr(t: torch.Tensor):
    """A kernel argument for the tensor's memory: its device address (no copy)."""
    import numpy as np
    return np.uint64(t.data_ptr() if t.numel() else 0)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_paged(kind: str, q, k_cache, v_cache) -> None:
    """What both attention kernels assume of q [rows, heads, head_dim] and the caches."""
    _check(q.dim() == 3 and k_cache.dim() == 4,
           f"paged {kind}: q must be [rows, heads, head_dim] and the caches [blocks, "
           f"block_size, kv_heads, head_dim]; got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    _check(v_cache.shape == k_cache.shape, f"paged {kind}: K and V caches differ in shape")
    _check(q.dtype in _DTYPE_TAG and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
           f"paged {kind}: q and the caches must share fp16 or bf16; got {q.dtype}, "
           f"{k_cache.dtype}, {v_cache.dtype}")
    _check(cache_dim == head_dim and head_dim in HEAD_DIMS,
           f"paged {kind}: head_dim {head_dim} (cache {cache_dim}); supported: "
           f"{', '.join(map(str, HEAD_DIMS))}")
    _check(block_size in BLOCK_SIZES, f"paged {kind}: block size {block_size}; supported: "
           f"{', '.join(map(str, BLOCK_SIZES))}")
    _check(num_heads % num_kv_heads == 0,
           f"paged {kind}: {num_heads} query heads over {num_kv_heads} KV heads")


def check_decode_args(q, k_cache, v_cache, block_tables, context_lens) -> None:
    """Everything the decode kernel assumes, as clear errors."""
    _check_paged("decode", q, k_cache, v_cache)
    num_seqs, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[2]
    _check(num_heads // num_kv_heads <= MAX_GROUP,
           f"paged decode: {num_heads} query heads over {num_kv_heads} KV heads; a group of "
           f"at most {MAX_GROUP} that divides evenly")
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs
           and block_tables.dtype == torch.int32,
           f"paged decode: block_tables must be int32 [{num_seqs}, max_blocks]")
    _check(tuple(context_lens.shape) == (num_seqs,) and context_lens.dtype == torch.int32,
           f"paged decode: context_lens must be int32 [{num_seqs}]")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.is_contiguous()
           and context_lens.is_contiguous(), "paged decode: caches and tables must be contiguous")
    _check(all(t.is_cuda and t.device == q.device
               for t in (q, k_cache, v_cache, block_tables, context_lens)),
           "paged decode: every tensor must be on the same CUDA device")


def check_cache_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check(k.dim() == 3 and k.shape == v.shape and k_cache.shape == v_cache.shape
           and k_cache.dim() == 4 and k.shape[1:] == k_cache.shape[2:],
           f"reshape_and_cache: k, v [tokens, kv_heads, head_dim] must match the caches' rows; "
           f"got {tuple(k.shape)} and {tuple(k_cache.shape)}")
    _check(k.dtype == k_cache.dtype == v.dtype == v_cache.dtype and k.element_size() in (2, 4),
           "reshape_and_cache: k, v and the caches must share one 16- or 32-bit dtype")
    _check(slot_mapping.dtype == torch.int64 and tuple(slot_mapping.shape) == (k.shape[0],),
           f"reshape_and_cache: slot_mapping must be int64 [{k.shape[0]}]")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(),
           "reshape_and_cache: the caches must be contiguous")
    _check(all(t.is_cuda and t.device == k.device for t in (v, k_cache, v_cache, slot_mapping)),
           "reshape_and_cache: every tensor must be on the same CUDA device")


def check_copy_args(cache, pairs) -> None:
    _check(pairs.dim() == 2 and pairs.shape[1] == 2 and pairs.dtype == torch.int64,
           "copy_blocks: pairs must be int64 [num_pairs, 2] (src, dst)")
    _check(cache.element_size() in (2, 4) and cache.is_contiguous(),
           "copy_blocks: the cache must be contiguous, with 16- or 32-bit elements")
    _check(cache.is_cuda and pairs.device == cache.device,
           "copy_blocks: the cache and pairs must be on the same CUDA device")


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
    block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32.

    `max_context` (an upper bound on context_lens; default: read from the device,
    a sync) picks the split count; each sequence splits its own context evenly
    among them, so a CUDA graph captured with a bound replays any shorter one."""
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_kernel = next(g for g in GROUP_KERNELS if g >= group)
    max_context = max_context or int(context_lens.max())
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context,
                                       _num_sms(q.device.index or 0))
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
        _kernel("paged_attention.cu", f"paged_decode_{tag}_g{group_kernel}")(
            (num_kv_heads, num_seqs, num_splits), (NUM_THREADS,),
            (_ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), _ptr(q), _ptr(k_cache),
             _ptr(v_cache), _ptr(block_tables), _ptr(context_lens),
             np.int32(block_tables.shape[1]), np.int32(num_kv_heads), np.int32(group),
             np.float32(scale), np.int32(num_splits),
             np.int32(block_size.bit_length() - 1)))
        if num_splits > 1:
            _kernel("paged_attention.cu", f"paged_decode_reduce_{tag}")(
                (num_heads, num_seqs), (head_dim,),
                (_ptr(out), _ptr(part_out), _ptr(part_max), _ptr(part_sum), np.int32(num_heads),
                 np.int32(num_splits)))
    return out


def check_prefill_args(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens) -> None:
    """Everything the prefill kernel assumes, as clear errors."""
    _check_paged("prefill", q, k_cache, v_cache)
    num_chunks = q_lens.shape[0] if q_lens.dim() == 1 else -1
    _check(block_tables.dim() == 2 and block_tables.shape[0] == num_chunks
           and block_tables.dtype == torch.int32,
           f"paged prefill: block_tables must be int32 [{num_chunks}, max_blocks]")
    _check(all(t.dtype == torch.int32 and tuple(t.shape) == (num_chunks,)
               for t in (q_starts, q_lens, ctx_lens)),
           f"paged prefill: q_starts, q_lens and ctx_lens must be int32 [{num_chunks}]")
    _check(q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
           and block_tables.is_contiguous(), "paged prefill: q, caches and tables must be "
           "contiguous")
    _check(all(t.device == q.device for t in (k_cache, v_cache, block_tables, q_starts,
                                              q_lens, ctx_lens)),
           "paged prefill: every tensor must be on the same device")


def prefill_launch(out, q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens,
                   scale: float, max_q_len: int):
    """(kernel name, grid, block, dynamic shared bytes, arguments) of one prefill launch;
    the arguments are tensors (passed as their device addresses) and numpy scalars.
    One CTA per (query head, 64 query rows, chunk); `max_q_len` bounds q_lens."""
    import numpy as np
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    block_n = 32 if head_dim == 256 else 64  # paged_prefill.cu's PREFILL_KERNEL lines
    smem = 2 * block_n * (head_dim + PREFILL_PAD) * q.element_size()
    grid = (num_heads, max(1, math.ceil(max_q_len / PREFILL_ROWS)), q_lens.shape[0])
    args = (out, q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens,
            np.int32(block_tables.shape[1]), np.int32(num_heads), np.int32(num_kv_heads),
            np.float32(scale * math.log2(math.e)), np.int32(block_size.bit_length() - 1))
    return f"paged_prefill_{_DTYPE_TAG[q.dtype]}_d{head_dim}", grid, (PREFILL_THREADS,), smem, args


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, q_starts: torch.Tensor,
                            q_lens: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                            max_q_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of prefill chunks over their paged K/V (already written there).
    q [num_tokens, num_heads, head_dim] fp16/bf16; chunk c's queries are rows
    q_starts[c] .. + q_lens[c] at positions ctx_lens[c] - q_lens[c] ..; block_tables
    [num_chunks, max_blocks], q_starts/q_lens/ctx_lens [num_chunks], all int32. Rows of
    `out` (default: a new tensor like q) that no chunk owns are left as they are."""
    q = q.contiguous()
    check_prefill_args(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens)
    _check(q.is_cuda, "paged prefill: the tensors must be on a CUDA device")
    out = torch.empty_like(q) if out is None else out
    _check(out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
           and out.device == q.device, "paged prefill: out must be a contiguous tensor like q")
    name, grid, block, smem, args = prefill_launch(out, q, k_cache, v_cache, block_tables,
                                                   q_starts, q_lens, ctx_lens, scale, max_q_len)
    with _stream():
        _kernel("paged_prefill.cu", name)(
            grid, block, tuple(_ptr(a) if isinstance(a, torch.Tensor) else a for a in args),
            shared_mem=smem)
    return out


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Scatter k, v [num_tokens, kvh, d] into the caches at slot_mapping (int64)."""
    import numpy as np
    check_cache_args(k, v, k_cache, v_cache, slot_mapping)
    bits = 16 if k.element_size() == 2 else 32
    row = k.shape[1] * k.shape[2]
    # held until the launch: a raw pointer keeps no tensor alive
    k, v = k.contiguous(), v.contiguous()
    with _stream():
        _kernel("cache_ops.cu", f"reshape_and_cache_{bits}")(
            (k.shape[0],), (min(1024, row),),
            (_ptr(k), _ptr(v), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping), np.int32(row)))


def copy_blocks(cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """pairs: [num_pairs, 2] int64 (src, dst) on the cache's device."""
    import numpy as np
    check_copy_args(cache, pairs)
    if not pairs.numel():
        return
    bits = 16 if cache.element_size() == 2 else 32
    with _stream():
        _kernel("cache_ops.cu", f"copy_blocks_{bits}")(
            (pairs.shape[0],), (256,), (_ptr(cache), _ptr(pairs), np.int64(cache[0].numel())))
