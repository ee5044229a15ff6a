"""The paged prefill kernel (kernels/paged_prefill.cu) run on the CPU, its own source,
against the torch reference.

g++ compiles the .cu with tests/unit/cuda_emulation.h standing in for the CUDA
built-ins (threads as fibers, real barriers, the mma instruction computed from the
PTX ISA's fragment layouts), and the launch is what `kernels.ops.prefill_launch`
makes for the GPU: the same kernel name, grid, block, shared memory and arguments.
This checks the kernel's indexing, paging, masking, online softmax and fragment
plumbing; the GPU tests (tests/gpu) check it on the hardware."""
import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from llmesh.kernels import ops
from llmesh.kernels.reference import paged_prefill_attention_ref
from paged_tables import random_block_tables

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "kernels" / "paged_prefill.cu"
KERNELS = [f"paged_prefill_{tag}_d{d}" for tag in ("f16", "bf16") for d in ops.HEAD_DIMS]
TYPES = {"f16": "__half", "bf16": "__nv_bfloat16"}
# (the emulated kernel needs a host C++20 compiler; the machines make test runs on have one)
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels compiled for the host: name -> a callable taking the launch."""
    root = tmp_path_factory.mktemp("prefill")
    lines = [f'#include "{SOURCE}"', "#include <functional>"]
    for name in KERNELS:
        t = TYPES[name.split("_")[2]]
        lines.append(
            f'extern "C" int run_{name}(void* out, const void* q, const void* k, const void* v, '
            f"const int* bt, const int* qs, const int* ql, const int* cl, int max_blocks, "
            f"int heads, int kv_heads, float scale_log2, int shift, unsigned gx, unsigned gy, "
            f"unsigned gz, unsigned threads, unsigned long smem) {{\n"
            f"  std::function<void()> body = [=] {{ {name}(({t}*)out, (const {t}*)q, "
            f"(const {t}*)k, (const {t}*)v, bt, qs, ql, cl, max_blocks, heads, kv_heads, "
            f"scale_log2, shift); }};\n"
            f"  return emu::launch({{gx, gy, gz}}, threads, smem, body) ? 0 : 1;\n}}")
    (root / "harness.cpp").write_text("\n".join(lines) + "\n")
    lib = root / "prefill.so"
    subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-DLLMESH_HOST_EMULATION",
                    "-include", str(HERE / "cuda_emulation.h"), "-o", str(lib),
                    str(root / "harness.cpp")], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def run_emulated(lib, q, k_cache, v_cache, tables, q_starts, q_lens, ctx_lens, scale, out):
    ops.check_prefill_args(q, k_cache, v_cache, tables, q_starts, q_lens, ctx_lens)
    name, grid, block, smem, args = ops.prefill_launch(
        out, q, k_cache, v_cache, tables, q_starts, q_lens, ctx_lens, scale,
        int(q_lens.max()))
    c_args = []
    for a in args:
        if isinstance(a, torch.Tensor):
            c_args.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, np.float32):
            c_args.append(ctypes.c_float(float(a)))
        else:
            c_args.append(ctypes.c_int(int(a)))
    rc = getattr(lib, f"run_{name}")(*c_args, *map(ctypes.c_uint, grid),
                                     ctypes.c_uint(block[0]), ctypes.c_ulong(smem))
    assert rc == 0, "a barrier some thread of a CTA never reached (deadlock)"
    return out


def paged_case(chunks, kvh, group, block_size, head_dim, dtype, seed, decode_rows=3):
    """Chunks as (tokens already cached, new tokens); `decode_rows` rows of q before
    them belong to no chunk (a step's single-query rows)."""
    g = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_block_tables([n + m for n, m in chunks], block_size, seed, 2)
    shape = (num_blocks, block_size, kvh, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    q_lens = [m for _, m in chunks]
    q = torch.randn(decode_rows + sum(q_lens), kvh * group, head_dim, generator=g).to(dtype)
    starts = np.cumsum([decode_rows] + q_lens)[:-1].tolist()
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return q, k, v, tables, i32(starts), i32(q_lens), i32([n + m for n, m in chunks])


CASES = [
    # (cached, new) per chunk; kv heads, group, block size, head dim
    ([(0, 70), (37, 5), (100, 64)], 2, 2, 16, 64),   # tiles cut mid-chunk, context before
    ([(0, 1), (0, 129)], 1, 3, 32, 64),              # a group of 3; a 1-row chunk
    ([(65, 80), (0, 17)], 1, 4, 32, 128),
    ([(10, 40)], 2, 1, 64, 256),
]


@needs_gxx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-g{}-bs{}-d{}".format(*c[1:]))
def test_emulated_prefill_kernel_matches_reference(emulated, case, dtype):
    chunks, kvh, group, block_size, head_dim = case
    q, k, v, tables, starts, lens, ctx = paged_case(chunks, kvh, group, block_size, head_dim,
                                                    dtype, seed=head_dim + group)
    scale = head_dim ** -0.5
    sentinel = torch.full_like(q, 7.0)
    out = run_emulated(emulated, q, k, v, tables, starts, lens, ctx, scale, sentinel.clone())
    ref = paged_prefill_attention_ref(q, k, v, tables, starts, lens, ctx, scale)
    rows = int(starts[0])
    assert torch.equal(out[:rows], sentinel[:rows]), "rows of no chunk were written"
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    err = (out[rows:].float() - ref[rows:].float()).abs().max().item()
    assert err <= tol, err


@needs_gxx
def test_emulation_reports_a_deadlock(tmp_path):
    """The emulator itself can fail: a barrier half the CTA skips is a deadlock."""
    src = tmp_path / "bad.cpp"
    src.write_text('#include <functional>\nextern "C" int run() {\n'
                   "  std::function<void()> body = [] { if (threadIdx.x < 64) __syncthreads(); };\n"
                   "  return emu::launch({1, 1, 1}, 128, 0, body) ? 0 : 1;\n}\n")
    lib = tmp_path / "bad.so"
    subprocess.run(["g++", "-std=c++20", "-shared", "-fPIC", "-include",
                    str(HERE / "cuda_emulation.h"), "-o", str(lib), str(src)], check=True)
    assert ctypes.CDLL(str(lib)).run() == 1


def test_reference_prefill_matches_dense_causal_attention():
    """The oracle itself: one chunk with no cached context is plain causal SDPA."""
    q, k, v, tables, starts, lens, ctx = paged_case([(0, 20)], 2, 2, 4, 8, torch.float32, 1,
                                                    decode_rows=0)
    out = paged_prefill_attention_ref(q, k, v, tables, starts, lens, ctx, 0.5)
    keys = k[tables[0, :5].long()].reshape(-1, 2, 8)[:20]
    values = v[tables[0, :5].long()].reshape(-1, 2, 8)[:20]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), is_causal=True,
        scale=0.5, enable_gqa=True).transpose(0, 1)
    assert torch.allclose(out, want, atol=1e-5)


def test_prefill_args_are_checked():
    q, k, v, tables, starts, lens, ctx = paged_case([(0, 4)], 1, 1, 16, 64, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="head_dim"):
        ops.check_prefill_args(q[..., :32].contiguous(), k, v, tables, starts, lens, ctx)
    with pytest.raises(ValueError, match="int32"):
        ops.check_prefill_args(q, k, v, tables, starts.long(), lens, ctx)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        ops.check_prefill_args(q.float(), k, v, tables, starts, lens, ctx)
    with pytest.raises(ValueError, match="CUDA"):
        ops.paged_prefill_attention(q, k, v, tables, starts, lens, ctx, 0.1, max_q_len=4)


@needs_gxx
def test_a_mixed_steps_metadata_drives_the_kernel_as_the_reference_backend(emulated):
    """What the CUDA backend hands the kernel (the step metadata's prefill table and
    bounds, built for kernel backends) gives the reference backend's prefill rows."""
    from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata
    torch.manual_seed(3)
    block_size, kvh, heads, d = 16, 2, 4, 64
    perm = torch.randperm(40).tolist()
    seqs = [SeqSlice(30, 1, perm[0:2]), SeqSlice(5, 1, perm[2:3]),       # decode rows
            SeqSlice(0, 70, perm[3:8]), SeqSlice(33, 40, perm[8:13]), SeqSlice(64, 2, perm[13:18])]
    meta = build_metadata(seqs, block_size, None, torch.device("cpu"), with_block_tables=True,
                          with_prefill_tables=True)
    assert meta.prefill_bounds.tolist() == [[2, 72, 112], [70, 40, 2], [70, 73, 66]]
    assert meta.max_prefill_len == 70
    plain = build_metadata(seqs, block_size, None, torch.device("cpu"), with_block_tables=True)
    assert plain.prefill_block_tables is None  # (not asked for: not built)
    k_cache = torch.randn(40, block_size, kvh, d).to(torch.bfloat16)
    v_cache = torch.randn(40, block_size, kvh, d).to(torch.bfloat16)
    q = torch.randn(114, heads, d).to(torch.bfloat16)
    ref = torch.zeros_like(q)
    TorchPagedAttention().attend_prefills(q, k_cache, v_cache, meta, 0.125, ref)
    b = meta.prefill_bounds
    out = run_emulated(emulated, q, k_cache, v_cache, meta.prefill_block_tables, b[0], b[1], b[2],
                       0.125, torch.zeros_like(q))
    assert not out[:2].any()
    assert (out[2:].float() - ref[2:].float()).abs().max() <= 2e-2
    meta = build_metadata(seqs, block_size, 8, torch.device("cpu"), with_block_tables=True,
                          with_prefill_tables=True)
    assert meta.prefill_block_tables is None  # a sliding window: the kernel does not apply
