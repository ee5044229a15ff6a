"""The whole-forward CPU decode kernel (cpu_decode.cpp): built, loaded, called.

It runs bfloat16 models (weights packed by `pack_rows`) and float32 models (weights
as the model holds them).

g++ builds it once per source (with its headers), compiler and CPU (`-O3 -march=native -fopenmp`)
into llmesh's cache ($LLMESH_CACHE_DIR, else ~/.cache/llmesh, under `native/`);
later starts load the built library (a few ms). It links the OpenMP runtime
torch already loaded (libgomp.so.1), so the two share one thread pool. Needs a
CPU with AVX512-BF16 and a C++ compiler; `unavailable()` says why not.

`DecodeKernel` holds what a call needs that does not change between steps (the
model's dimensions, its weights' and caches' addresses: the tensors must stay
alive and in place, and the C++ side's buffers for up to `max_rows` rows) and
runs a step from its per-step arrays.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
HEADERS = [Path(__file__).with_name(n) for n in (
    "cpu_decode_vec.h", "cpu_decode_attention.h", "cpu_decode_products.h", "cpu_fused_ops.h",
    "cpu_prefill_attention.h")]
DTYPES = {torch.bfloat16: 0, torch.float32: 1}  # the kernel's dtype codes
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MAX_GROUP, MAX_HEAD_DIM = 8, 256
_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    base = os.environ.get("LLMESH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "llmesh")
    return Path(base) / "native"


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable() -> str | None:
    """Why this process cannot run the kernel (None: it can)."""
    if "avx512_bf16" not in cpu_flags():
        return "the CPU has no AVX512-BF16"
    if _compiler() is None:
        return "no C++ compiler on PATH"
    return None


def library() -> ctypes.CDLL:
    """The built kernel, built first if this source, compiler and CPU have none yet."""
    global _library
    with _lock:
        if _library is None:
            _library = _load(_build())
        return _library


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
                         + " ".join(FLAGS).encode() + version.encode()
                         + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_decode-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # (another process building the same key wrote the same bytes)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_float
    lib.llmesh_cpu_decode_new.argtypes = [i64, f32, f32, ctypes.POINTER(p), i32, i64, i32]
    lib.llmesh_cpu_decode_new.restype = p
    lib.llmesh_cpu_decode_free.argtypes = [p]
    lib.llmesh_cpu_decode_free.restype = None
    lib.llmesh_cpu_decode_run.argtypes = [p, i32, p, p, p, p, i32, p, p, i32]
    lib.llmesh_cpu_decode_run.restype = ctypes.c_int
    lib.llmesh_cpu_prefill_attention.argtypes = [p, p, p, i32, i32, i32, i32, i32, f32, p, i32]
    lib.llmesh_cpu_prefill_attention.restype = None
    lib.llmesh_cpu_decode_attention.argtypes = [p, p, p, p, i32, p, i32, i32, i32, i32, i32,
                                                ctypes.c_int64, f32, p, i32]
    lib.llmesh_cpu_decode_attention.restype = ctypes.c_int
    lib.llmesh_cpu_product.argtypes = [p, p, i32, i32, p, i32, p, i32, i32]
    lib.llmesh_cpu_product.restype = None
    lib.llmesh_cpu_rms_norm.argtypes = [p, p, p, i32, i32, f32, p, i32]
    lib.llmesh_cpu_rms_norm.restype = None
    lib.llmesh_cpu_rope.argtypes = [p, i32, i32, p, p, p, ctypes.c_int64, i32, i32, i32]
    lib.llmesh_cpu_rope.restype = ctypes.c_int
    lib.llmesh_cpu_silu_and_mul.argtypes = [p, i32, i32, p, i32]
    lib.llmesh_cpu_silu_and_mul.restype = None
    return lib


def pack_rows(weight: torch.Tensor) -> torch.Tensor:
    """A projection's [rows, in] weight in the kernel's layout. bfloat16: per block of 16
    output rows (zero rows pad the last), per pair of inputs, the pair of each row
    ([ceil(rows / 16), in / 2, 16, 2]; the same bytes as the weight, padding aside).
    float32: the weight itself, row-major (no copy when it is contiguous)."""
    rows, cols = weight.shape
    if cols % 32:
        raise ValueError(f"the CPU decode kernel needs input widths that are multiples of 32, not {cols}")
    if weight.dtype == torch.float32:
        return weight.detach().contiguous()
    padded = -(-rows // 16) * 16
    w = weight.detach().to(torch.bfloat16)
    if padded != rows:
        w = torch.cat([w, w.new_zeros(padded - rows, cols)])
    return w.view(padded // 16, 16, cols // 2, 2).permute(0, 2, 1, 3).contiguous()


def product(packed: torch.Tensor, bias: torch.Tensor | None, rows: int, x: torch.Tensor,
            threads: int) -> torch.Tensor:
    """x [B, in] (bfloat16 or float32) times a [rows, in] weight of its dtype in the
    layout of `pack_rows` (plus bias): [B, rows] float32, each value rounded to x's
    dtype as the eager projection's output is. Each row's result is the same bits
    whatever else the batch holds."""
    if x.dim() != 2 or x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError("the CPU product takes a [rows, in] bfloat16 or float32 CPU input")
    n, width = x.shape
    layout = (-(-rows // 16), width // 2, 16, 2) if x.dtype == torch.bfloat16 else (rows, width)
    if packed.shape != layout or packed.dtype != x.dtype or not packed.is_contiguous() \
            or width % 32:
        raise ValueError(f"the CPU product's weight is not a packed [{rows}, {width}] {x.dtype} weight")
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x.dtype
                             or not bias.is_contiguous()):
        raise ValueError(f"the CPU product's bias is not a contiguous [{rows}] {x.dtype}")
    x = x.contiguous()
    out = torch.empty(n, rows, dtype=torch.float32)
    library().llmesh_cpu_product(packed.data_ptr(), bias.data_ptr() if bias is not None else None,
                                 width, rows, x.data_ptr(), n, out.data_ptr(), threads,
                                 DTYPES[x.dtype])
    return out


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    block_size: int
    eps: float


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors, contiguous, on the CPU, all of one dtype (bfloat16 or
    float32): the projections' weights in the layout of `pack_rows`, the rest as the
    model has them (qkv_b may be None)."""

    in_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def check_supported(dims: ModelDims) -> None:
    """ValueError naming what this kernel cannot run."""
    group = dims.heads // max(dims.kv_heads, 1)
    why = [w for ok, w in (
        (dims.heads % dims.kv_heads == 0, "query heads not a multiple of the KV heads"),
        (group <= MAX_GROUP, f"more than {MAX_GROUP} query heads per KV head"),
        (dims.head_dim % 32 == 0 and dims.head_dim <= MAX_HEAD_DIM,
         f"head_dim {dims.head_dim} (a multiple of 32 up to {MAX_HEAD_DIM})"),
        (dims.hidden % 32 == 0 and dims.inter % 32 == 0 and (dims.heads * dims.head_dim) % 32 == 0,
         "widths not multiples of 32"),
    ) if not ok]
    if why:
        raise ValueError("the CPU decode kernel cannot run this model: " + "; ".join(why))


def _heads_refusal(H: int, KVH: int, D: int, dtype: torch.dtype) -> list[str]:
    return [w for ok, w in (
        (dtype == torch.bfloat16, "bfloat16 only"),
        (D % 32 == 0 and D <= MAX_HEAD_DIM, f"head_dim {D} (a multiple of 32 up to {MAX_HEAD_DIM})"),
        (KVH > 0 and H % KVH == 0 and H // KVH <= MAX_GROUP,
         f"{H} query heads over {KVH} KV heads"),
    ) if not ok]


def prefill_refusal(q_shape, kv_shape, dtype: torch.dtype) -> str | None:
    """Why `prefill_attention` would refuse these shapes (None: it takes them)."""
    (L, H, D), (C, KVH, _) = q_shape, kv_shape
    why = _heads_refusal(H, KVH, D, dtype) + ([] if 1 <= L <= C else [f"{L} queries over {C} keys"])
    return "; ".join(why) or None


def decode_refusal(num_heads: int, k_cache: torch.Tensor) -> str | None:
    """Why `decode_attention` would refuse a model's query heads over this cache
    ([blocks, block_size, KVH, D]; None: it takes them)."""
    _, _, kvh, d = k_cache.shape
    return "; ".join(_heads_refusal(num_heads, kvh, d, k_cache.dtype)) or None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      threads: int) -> torch.Tensor:
    """Causal attention of a chunk at the end of its context: q [L, H, D], k and v
    [C, KVH, D] bfloat16 CPU tensors, row i seeing keys 0 .. C - L + i -> [L, H, D]."""
    why = prefill_refusal(tuple(q.shape), tuple(k.shape), q.dtype) or (
        None if k.shape == v.shape and k.dtype == v.dtype == q.dtype and k.shape[2] == q.shape[2]
        and q.device.type == "cpu" else "keys and values of other shapes or types")
    if why:
        raise ValueError(f"the CPU prefill attention cannot run this: {why}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    (L, H, D), (C, KVH) = q.shape, k.shape[:2]
    library().llmesh_cpu_prefill_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), L, C, H, KVH,
                                           D, scale, out.data_ptr(), threads)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                     threads: int) -> torch.Tensor:
    """Single-query rows over a paged cache: q [B, H, D] bfloat16, caches [blocks,
    block_size, KVH, D] bfloat16, tables [B, width] and ctx_lens [B] (int32) -> [B, H, D]:
    the whole-forward kernel's attention, row by row."""
    why = decode_refusal(q.shape[1], k_cache) or (
        None if q.dtype == k_cache.dtype and v_cache.shape == k_cache.shape
        and v_cache.dtype == k_cache.dtype and q.shape[2] == k_cache.shape[3]
        and k_cache.is_contiguous() and v_cache.is_contiguous() and q.device.type == "cpu"
        and tables.shape[0] == ctx_lens.shape[0] == q.shape[0]
        else "queries, keys, values or tables of other shapes or types")
    if why:
        raise ValueError(f"the CPU decode attention cannot run this: {why}")
    q = q.contiguous()
    tables, ctx_lens = tables.to(torch.int32).contiguous(), ctx_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    (B, H, D), (blocks, block_size, KVH) = q.shape, k_cache.shape[:3]
    code = library().llmesh_cpu_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
        ctx_lens.data_ptr(), B, H, KVH, D, block_size, blocks, scale, out.data_ptr(), threads)
    if code:
        raise ValueError(f"the CPU decode attention's {_REFUSED.get(code, code)}")
    return out


_REFUSED = {-1: "row count out of range", -2: "ids out of range", -3: "positions out of range",
            -4: "slots out of range", -5: "tables out of range",
            -6: "context lengths exceed their block tables"}


class DecodeKernel:
    def __init__(self, dims: ModelDims, embed: torch.Tensor, final_norm: torch.Tensor,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor, layers: list[LayerWeights],
                 max_rows: int = 8):
        check_supported(dims)
        if max_rows < 1:
            raise ValueError("the CPU decode kernel needs room for a row")
        tensors = [embed, final_norm] + [t for w in layers for t in (
            w.in_norm, w.qkv_w, w.o_w, w.post_norm, w.gate_up_w, w.down_w, w.k_cache, w.v_cache)
            + ((w.qkv_b,) if w.qkv_b is not None else ())]
        self.dtype = embed.dtype
        for t in tensors:
            if t.dtype != self.dtype or self.dtype not in DTYPES or t.device.type != "cpu" \
                    or not t.is_contiguous():
                raise ValueError("the CPU decode kernel takes contiguous CPU tensors, all "
                                 "bfloat16 or all float32")
        for t in (rope_cos, rope_sin):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("the RoPE tables must be contiguous float32")
        self.lib = library()
        self.hidden = dims.hidden
        # what the forward reads unchecked, bounded by the C++ before it starts
        limits = (ctypes.c_int64 * 4)(embed.shape[0], rope_cos.shape[0],
                                      layers[0].k_cache.shape[0] * dims.block_size,
                                      layers[0].k_cache.shape[0])
        self._keep = tensors + [rope_cos, rope_sin]
        ptrs = [embed.data_ptr(), final_norm.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr()]
        for w in layers:
            ptrs += [w.in_norm.data_ptr(), w.qkv_w.data_ptr(),
                     w.qkv_b.data_ptr() if w.qkv_b is not None else 0, w.o_w.data_ptr(),
                     w.post_norm.data_ptr(), w.gate_up_w.data_ptr(), w.down_w.data_ptr(),
                     w.k_cache.data_ptr(), w.v_cache.data_ptr()]
        c_ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        c_dims = (ctypes.c_int64 * 7)(dims.hidden, dims.inter, dims.heads, dims.kv_heads,
                                      dims.head_dim, dims.layers, dims.block_size)
        self.max_rows = max_rows
        self._ctx = self.lib.llmesh_cpu_decode_new(c_dims, dims.eps, dims.head_dim ** -0.5,
                                                   c_ptrs, max_rows, limits, DTYPES[self.dtype])
        # (its buffers freed with this object)
        self._free = weakref.finalize(self, self.lib.llmesh_cpu_decode_free, self._ctx)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            tables: torch.Tensor, ctx_lens: torch.Tensor, threads: int) -> torch.Tensor:
        """One decode step of len(ids) rows: ids, positions, slots int64 [B]; tables int32
        [B, width]; ctx_lens int32 [B] -> the final norm's output, [B, hidden] in the
        model's dtype."""
        n = ids.numel()
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"the CPU decode kernel takes 1 to {self.max_rows} rows, not {n}")
        if not (positions.numel() == slots.numel() == ctx_lens.numel() == tables.shape[0] == n):
            raise ValueError("the CPU decode kernel's per-row inputs differ in length")
        out = torch.empty(n, self.hidden, dtype=self.dtype)
        i64, i32 = torch.int64, torch.int32
        ids, positions, slots = (t.to(i64).contiguous() for t in (ids, positions, slots))
        tables, ctx_lens = tables.to(i32).contiguous(), ctx_lens.to(i32).contiguous()
        code = self.lib.llmesh_cpu_decode_run(self._ctx, n, ids.data_ptr(), positions.data_ptr(),
                                              slots.data_ptr(), tables.data_ptr(), tables.shape[1],
                                              ctx_lens.data_ptr(), out.data_ptr(), threads)
        if code:
            raise ValueError(f"the CPU decode kernel's {_REFUSED.get(code, code)}")
        return out
