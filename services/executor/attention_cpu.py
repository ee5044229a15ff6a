"""Decode attention on a CPU over a 16-bit paged cache, compiled.

The reference backend (attention.py) gathers each group's K/V blocks into a
workspace, widens them to float32 and runs SDPA: at 64 decode sequences of 256
tokens that is three passes over the keys and values per layer, and most of a
bfloat16 step (bench model: 29 of 39 ms a forward). Here the single-query rows
are one function of the block table, compiled by inductor into loops that read
each key and value where it lies in the cache: scores and softmax in float32,
the result rounded once to the cache's dtype (2.3-3.4x faster per layer at 16-64
rows of 101-512 tokens on the bench box;
`benchmarks/results/cpu-decode/compiled-attention.log`).

Compiled at start (`warm_up`), once per thread count a step may use, with the
rows, the table's width and the cache's blocks dynamic, so no step recompiles;
small steps (under MIN_COMPILED_KEYS keys, one row, or one block) take the
reference backend's gather and SDPA, where a compiled call's guards would
cost more. Where inductor cannot compile (no C++ compiler, or
`LLMESH_COMPILED_CPU_ATTENTION=0`) this backend is the reference one (its
grouped inputs, gathers and SDPA) and the start-up log says why.

Prefill chunks over a bfloat16 cache, on a CPU with AVX512-BF16, run the C++
causal attention (kernels/cpu_prefill_attention.h: 16 keys' scores a dot
product at a time, online softmax in float32) on their gathered context;
torch's flash attention for CPU took as long as all of a layer's projections
for a 512-token chunk. `LLMESH_CPU_PREFILL_KERNEL=0` (or a float16 cache, or
head shapes it does not take) keeps the reference path.
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
import torch.nn.functional as F

from llmesh.kernels import cpu_decode
from llmesh.services.executor.attention import AttentionMetadata, TorchPagedAttention

log = logging.getLogger("llmesh.executor")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# below this many keys (rows x padded width) a step attends eagerly: at one sequence the
# compiled call's guards and launch cost more than its loops save
MIN_COMPILED_KEYS = 2048
RECOMPILE_LIMIT = 64


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row over its blocks: q [B, H, D], caches [blocks, block_size, KVH, D],
    block_table [B, MB] long, context_lens [B] long -> [B, H, D] in q's dtype."""
    num_rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    width = block_table.shape[1] * block_size
    k = k_cache[block_table].view(num_rows, width, num_kv_heads, head_dim).permute(0, 2, 1, 3)
    v = v_cache[block_table].view(num_rows, width, num_kv_heads, head_dim).permute(0, 2, 1, 3)
    qg = q.view(num_rows, num_kv_heads, group, head_dim).float()
    # (products summed, not matmuls: inductor fuses the gather into the reduction)
    scores = (qg[:, :, :, None, :] * k[:, :, None, :, :].float()).sum(-1) * scale
    visible = torch.arange(width, device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    out = (probs[..., None] * v[:, :, None, :, :].float()).sum(-2)
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype)


def compiler_missing() -> str | None:
    """Why this process cannot compile the decode attention (None: it can)."""
    if os.environ.get("LLMESH_COMPILED_CPU_ATTENTION", "1") == "0":
        return "LLMESH_COMPILED_CPU_ATTENTION=0"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler on PATH"
    return None


def wants_compiled(device: torch.device, dtype: torch.dtype, sliding_window: int | None) -> bool:
    """The backend for a model: a 16-bit cache on a CPU, without a sliding window."""
    return device.type == "cpu" and dtype in HALF_DTYPES and sliding_window is None


class CompiledCpuAttention(TorchPagedAttention):
    """Single-query rows through `paged_decode` compiled (the kernel backends' inputs:
    one padded block table and the context lengths); prefill chunks as the reference."""

    wants_block_tables = True

    def __init__(self):
        super().__init__()
        self.compiled = False
        self._decode = None
        self.why_eager = compiler_missing()
        if self.why_eager is None:
            # one graph per (dtype, heads, head_dim, thread count): a process with several
            # models or runners (an in-process benchmark's variants, the test suite)
            # passes dynamo's default of 8 per function, and then every later runner
            # would attend eagerly
            import torch._dynamo
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       RECOMPILE_LIMIT)
            self._decode = torch.compile(paged_decode, dynamic=False, fullgraph=True)
        # (the reference backend's grouped inputs unless compiled or native: see warm_up)
        self.wants_block_tables = self.why_eager is None
        self.native_decode = False  # (decided by warm_up, which sees the cache)
        self.native = cpu_decode.unavailable() is None
        if self.native:
            try:  # (built now, or found built: a failed build keeps torch's attention)
                cpu_decode.library()
            except (RuntimeError, OSError) as e:
                self.native = False
                log.warning("attention: torch's (the C++ kernel: %s)", str(e)[:300])
        self.native_prefill = self.native and os.environ.get("LLMESH_CPU_PREFILL_KERNEL",
                                                             "1") != "0"

    @torch.inference_mode()
    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                scale: float) -> None:
        """Take the C++ decode attention if it runs this cache, else compile now (a few
        seconds; inductor's disk cache makes later starts quick), or fall back to the
        reference backend for good if that fails."""
        refusal = "LLMESH_CPU_DECODE_ATTENTION=0" \
            if os.environ.get("LLMESH_CPU_DECODE_ATTENTION", "1") == "0" else \
            ("no C++ kernel" if not self.native else cpu_decode.decode_refusal(num_heads, k_cache))
        self.native_decode = refusal is None
        if self.native_decode:
            self.wants_block_tables = True
        elif self.why_eager is None:
            # rows, table width and the caches' blocks dynamic (and different at tracing:
            # one symbol each)
            q = torch.zeros(3, num_heads, k_cache.shape[3], dtype=k_cache.dtype)
            table, lens = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, dtype=torch.long)
            for t, dims in ((q, (0,)), (table, (0, 1)), (lens, (0,)), (k_cache, (0,)),
                            (v_cache, (0,))):
                for d in dims:
                    torch._dynamo.mark_dynamic(t, d)
            threads = torch.get_num_threads()
            try:  # (a graph per thread count: small steps run on one thread fewer)
                for n in sorted({threads, max(1, threads - 1)}):
                    torch.set_num_threads(n)
                    self._decode(q, k_cache, v_cache, table, lens, scale)
                self.compiled = True
            except Exception as e:  # (inductor's errors have no common base)
                self.why_eager = f"compiling failed: {type(e).__name__}: {str(e)[:200]}"
                self.wants_block_tables = False
            finally:
                torch.set_num_threads(threads)
        log.info("decode attention over the %s KV cache: %s", k_cache.dtype,
                 "C++ kernel" if self.native_decode else "compiled" if self.compiled
                 else f"eager ({self.why_eager}; C++ kernel: {refusal})")

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        if not self.wants_block_tables:  # not compiled: the reference backend, as it is
            return super().attend(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if meta.num_single:
            n = meta.num_single
            out[:n] = self._single(q[:n], k_cache, v_cache, meta.single_block_tables,
                                   meta.single_context_lens, scale)
        self.attend_prefills(q, k_cache, v_cache, meta, scale, out)
        return out

    def attend_prefills(self, q, k_cache, v_cache, meta, scale, out) -> None:
        if not meta.prefills or not self.native_prefill or cpu_decode.prefill_refusal(
                (1, q.shape[1], q.shape[2]), (1, k_cache.shape[2], k_cache.shape[3]), q.dtype):
            return super().attend_prefills(q, k_cache, v_cache, meta, scale, out)
        threads = torch.get_num_threads()
        for c in meta.prefills:
            rows = slice(c.q_start, c.q_start + c.q_len)
            k = self._gather("k", k_cache, c.block_ids).flatten(0, 1)[:c.ctx_len]
            v = self._gather("v", v_cache, c.block_ids).flatten(0, 1)[:c.ctx_len]
            out[rows] = cpu_decode.prefill_attention(q[rows], k, v, scale, threads)

    def _single(self, q, k_cache, v_cache, tables, lens, scale):
        if self.native_decode:
            return cpu_decode.decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                               torch.get_num_threads())
        n, width = tables.shape
        if n < 2 or width < 2 or n * width * k_cache.shape[1] < MIN_COMPILED_KEYS:
            # a small step: a compiled call's guards and launch cost more than it saves
            return self._eager_single(q, k_cache, v_cache, tables, lens, scale)
        return self._decode(q.contiguous(), k_cache, v_cache, tables.long(), lens.long(), scale)

    def _eager_single(self, q, k_cache, v_cache, tables, lens, scale):
        """The same maths as the reference backend's: the blocks gathered into the
        workspace, widened, then SDPA in float32 with the padding masked."""
        n, width = tables.shape
        block_ids = tables.reshape(-1).long()
        k = self._widened("kf", self._gather("k", k_cache, block_ids)).view(n, -1, *k_cache.shape[2:])
        v = self._widened("vf", self._gather("v", v_cache, block_ids)).view(n, -1, *v_cache.shape[2:])
        visible = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
        out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=visible[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2).to(q.dtype)
