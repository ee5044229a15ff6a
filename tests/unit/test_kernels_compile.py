"""Every CUDA kernel compiles with NVRTC, the compiler CuPy runs on a GPU machine,
for Ampere (compute_80) and Hopper (compute_90), and with nvcc (sm_80, sm_90a).

NVRTC has no host C++ headers: a source that includes one, or uses a macro of
one (INFINITY), compiles with nvcc and fails on the first GPU request. NVRTC and
the CUDA headers come from the `nvidia-cuda-nvrtc` / `nvidia-cuda-runtime`
wheels (test dependencies), so this runs on machines without a GPU or a CUDA
toolkit."""
import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmesh.kernels.reference import copy_blocks_ref, paged_decode_attention_ref, reshape_and_cache_ref

KERNELS = sorted((Path(__file__).resolve().parents[2] / "kernels").glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _cuda_wheels() -> Path | None:
    """nvidia/cu13 of the NVRTC and runtime wheels (None when not installed)."""
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else ()):
        root = Path(base) / "cu13"
        if list((root / "lib").glob("libnvrtc.so.*")) and (root / "include" / "cuda_fp16.h").exists():
            return root
    return None


def nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[int, str, int]:
    """(NVRTC result, its log, PTX size) for `source`: CuPy's RawModule does the same
    (nvrtcCreateProgram, nvrtcCompileProgram with the toolkit's include directory)."""
    root = _cuda_wheels()
    lib = ctypes.CDLL(str(sorted((root / "lib").glob("libnvrtc.so.*"))[0]))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                  None, None) == 0
    opts = [o.encode() for o in options + [f"-I{root / 'include'}"]]
    result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = ctypes.c_size_t(0)
    if result == 0:  # a real architecture (sm_XX) gives a cubin: ptxas ran on the PTX
        real = any(o.startswith("--gpu-architecture=sm_") for o in options)
        (lib.nvrtcGetCUBINSize if real else lib.nvrtcGetPTXSize)(prog, ctypes.byref(ptx))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace"), ptx.value


def test_there_are_kernels():
    assert {p.name for p in KERNELS} >= {"paged_attention.cu", "cache_ops.cu"}


@pytest.mark.skipif(_cuda_wheels() is None, reason="the nvidia-cuda-nvrtc / nvidia-cuda-runtime "
                    "wheels are not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_with_nvrtc_as_cupy_runs_it(source, arch):
    from llmesh.kernels.ops import NVRTC_OPTIONS
    result, log, ptx_size = nvrtc_compile(source.read_text(), source.name,
                                          [f"--gpu-architecture={arch}", *NVRTC_OPTIONS])
    assert result == 0, log
    assert ptx_size > 0


@pytest.mark.skipif(_cuda_wheels() is None, reason="NVRTC wheels not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", [p for p in KERNELS if "asm" in p.read_text()],
                         ids=lambda p: p.name)
def test_inline_ptx_assembles(source, arch):
    """Inline PTX (the tensor-core mma) is only text to NVRTC's front end; a cubin for a
    real architecture runs ptxas over it, as the driver would on the first launch."""
    from llmesh.kernels.ops import NVRTC_OPTIONS
    result, log, cubin_size = nvrtc_compile(source.read_text(), source.name,
                                            [f"--gpu-architecture={arch}", *NVRTC_OPTIONS])
    assert result == 0, log
    assert cubin_size > 0


@pytest.mark.skipif(_cuda_wheels() is None, reason="NVRTC wheels not installed")
def test_a_host_header_fails_the_nvrtc_compile():
    """The check can fail: what nvcc accepted and every GPU user then hit."""
    result, log, _ = nvrtc_compile("#include <cstdint>\n__global__ void k(int64_t* p) {}\n",
                                   "bad.cu", ["--gpu-architecture=compute_80"])
    assert result != 0 and "cstdint" in log
    result, log, _ = nvrtc_compile("__global__ void k(float* p) { p[0] = -INFINITY; }\n",
                                   "bad2.cu", ["--gpu-architecture=compute_80"])
    assert result != 0 and "INFINITY" in log


NVCC_ARCHS = ["sm_90a", "sm_80"]


@pytest.fixture(scope="module", autouse=True)
def nvcc_builds(tmp_path_factory):
    """Every (kernel, arch) nvcc compile, started side by side when the module's first
    test starts (each nvcc is one thread, like the NVRTC compiles here, which run
    meanwhile); a test waits for its own. Those still running at the end are killed."""
    if NVCC is None:
        yield {}
        return
    root = tmp_path_factory.mktemp("nvcc")
    builds = {}
    try:
        for source in KERNELS:
            for arch in NVCC_ARCHS:
                cubin = root / f"{source.stem}-{arch}.cubin"
                proc = subprocess.Popen([NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Werror",
                                         "all-warnings", "-o", str(cubin), str(source)],
                                        cwd=root, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                builds[source.name, arch] = (proc, cubin)
        yield builds
    finally:
        for proc, _ in builds.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("arch", NVCC_ARCHS)
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles(source, arch, nvcc_builds):
    proc, cubin = nvcc_builds[source.name, arch]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert cubin.stat().st_size > 0


def test_reference_decode_matches_dense_attention():
    """The oracle itself: paged reference == plain softmax attention on contiguous K/V."""
    torch.manual_seed(0)
    num_blocks, bs, kvh, d, heads = 12, 4, 2, 8, 4
    k_cache, v_cache = torch.randn(num_blocks, bs, kvh, d), torch.randn(num_blocks, bs, kvh, d)
    tables = torch.tensor([[3, 7, 1], [5, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([10, 3], dtype=torch.int32)
    q = torch.randn(2, heads, d)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.3)
    for i in range(2):
        k = k_cache[tables[i].long()].reshape(-1, kvh, d)[:lens[i]].repeat_interleave(2, dim=1)
        v = v_cache[tables[i].long()].reshape(-1, kvh, d)[:lens[i]].repeat_interleave(2, dim=1)
        p = (torch.einsum("hd,thd->ht", q[i], k) * 0.3).softmax(-1)
        assert torch.allclose(out[i], torch.einsum("ht,thd->hd", p, v), atol=1e-5)


def test_reference_cache_ops():
    cache_k, cache_v = torch.zeros(4, 2, 1, 3), torch.zeros(4, 2, 1, 3)
    k, v = torch.ones(3, 1, 3), 2 * torch.ones(3, 1, 3)
    reshape_and_cache_ref(k, v, cache_k, cache_v, torch.tensor([5, -1, 0]))
    assert cache_k[2, 1].sum() == 3 and cache_v[0, 0].sum() == 6 and cache_k.sum() == 6
    copy_blocks_ref(cache_k, [(2, 3)])
    assert torch.equal(cache_k[3], cache_k[2])
