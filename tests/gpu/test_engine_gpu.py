"""The whole engine on CUDA gives the CPU reference's greedy tokens (GPU only)."""
import random

import pytest
import torch

from hf_models import make_hf_model
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.attention_cuda import CudaPagedAttention

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _prompts(vocab, n=12):
    rng = random.Random(0)
    return [[1] + rng.choices(range(3, vocab), k=rng.randint(2, 200)) for _ in range(n)]


def test_tiny_model_fp32_on_gpu_matches_cpu(tiny_model_dir):
    prompts = _prompts(3000)
    cpu = Engine.from_pretrained(tiny_model_dir).generate(prompts, GREEDY)
    gpu = Engine.from_pretrained(tiny_model_dir, EngineConfig(device="cuda")).generate(prompts, GREEDY)
    assert [r[0].token_ids for r in gpu] == [r[0].token_ids for r in cpu]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernel_backend_matches_torch_backend(tmp_path, dtype):
    # head_dim 64: the shape the CUDA kernels serve
    hf, path = make_hf_model("llama", tmp_path / "m", head_dim=64)
    import json
    cfg = json.loads((path / "config.json").read_text())
    prompts = _prompts(cfg["vocab_size"])
    eng = Engine.from_pretrained(path, EngineConfig(device="cuda", dtype=dtype))
    assert isinstance(eng.runner.backend, CudaPagedAttention)
    assert eng.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    fast = eng.generate(prompts, GREEDY)
    # (no CUDA graphs: they replay the backend they were captured with)
    ref_engine = Engine.from_pretrained(path, EngineConfig(device="cuda", dtype=dtype,
                                                           cuda_graphs=False))
    ref_engine.runner.backend = ref_engine.runner.reference_backend()
    ref = ref_engine.generate(prompts, GREEDY)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(fast, ref))
    assert same >= len(prompts) - 1  # 16-bit near-ties may flip one


def test_prefill_kernel_engine_matches_reference_backend(tmp_path, monkeypatch):
    """The paged prefill kernel switched on: prompts of 2-200 tokens, chunked by a small
    token budget (chunks after cached context), the reference backend's greedy tokens."""
    hf, path = make_hf_model("llama", tmp_path / "m", head_dim=64)
    import json
    cfg = json.loads((path / "config.json").read_text())
    prompts = _prompts(cfg["vocab_size"])
    monkeypatch.setenv("LLMESH_CUDA_PREFILL_KERNEL", "1")
    eng = Engine.from_pretrained(path, EngineConfig(device="cuda", dtype="bfloat16",
                                                    max_num_batched_tokens=96))
    assert eng.runner.backend.prefill_kernel
    fast = eng.generate(prompts, GREEDY)
    monkeypatch.setenv("LLMESH_CUDA_PREFILL_KERNEL", "0")
    ref_engine = Engine.from_pretrained(path, EngineConfig(device="cuda", dtype="bfloat16",
                                                           cuda_graphs=False,
                                                           max_num_batched_tokens=96))
    ref_engine.runner.backend = ref_engine.runner.reference_backend()
    ref = ref_engine.generate(prompts, GREEDY)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(fast, ref))
    assert same >= len(prompts) - 1  # 16-bit near-ties may flip one


def test_each_step_moves_its_inputs_in_one_pinned_copy(tiny_model_dir):
    """Token ids, positions, slot mapping, block tables and context lengths of a
    step reach the GPU in one non-blocking copy from pinned memory, and two
    steps' slabs alternate (a slab is reused only once its copy is done)."""
    eng = Engine.from_pretrained(tiny_model_dir, EngineConfig(device="cuda"))
    staging = eng.runner.staging
    assert staging.pinned
    out = eng.generate(_prompts(3000, n=6), GREEDY)
    assert all(len(r[0].token_ids) == GREEDY.max_tokens for r in out)
    assert 0 < staging.num_copies <= eng.stats.num_steps  # (a step with nothing to run: none)
    assert all(s is None or s.is_pinned() for s in staging._slabs)
