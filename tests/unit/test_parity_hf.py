"""Parity with Hugging Face transformers on the same weights."""
import random

import pytest
import torch

from hf_models import ARCHS, make_hf_model
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata
from llmesh.services.executor.weights import load_model

LOGIT_ATOL = 1e-4  # fp32, same weights: only summation order differs


@pytest.fixture(scope="module", params=ARCHS)
def hf_pair(request, tmp_path_factory):
    hf, path = make_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, hf, path


def _engine_logits(model, token_ids: list[int], chunk: int) -> torch.Tensor:
    """Teacher-forced logits of every position, computed `chunk` tokens per forward
    over a paged cache with deliberately scattered block ids."""
    block_size = 4
    num_blocks = len(token_ids) // block_size + 2
    c = model.config
    shape = (num_blocks * 2, block_size, c.num_kv_heads, c.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.num_layers)]
    block_ids = list(range(num_blocks * 2 - 1, 0, -2))  # non-contiguous, descending
    out = []
    for start in range(0, len(token_ids), chunk):
        ids = token_ids[start:start + chunk]
        meta = build_metadata([SeqSlice(start, len(ids), block_ids)], block_size, c.sliding_window,
                              torch.device("cpu"))
        hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), caches, meta,
                       TorchPagedAttention())
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_teacher_forced_logits_match(hf_pair, chunk):
    arch, hf, path = hf_pair
    model = load_model(path)
    tokens = random.Random(1).choices(range(3, 320), k=61)
    ref = hf(torch.tensor([tokens])).logits[0]
    ours = _engine_logits(model, tokens, chunk)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < LOGIT_ATOL, f"{arch}: max |logit diff| {err}"
    assert ref.std() > 0.1  # the comparison is not between two near-constant tensors


@torch.inference_mode()
def test_greedy_concurrent_matches_hf_generate_alone(hf_pair):
    arch, hf, path = hf_pair
    rng = random.Random(7)
    prompts = [[1] + rng.choices(range(3, 320), k=rng.randint(1, 90)) for _ in range(16)]
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    engine = Engine.from_pretrained(path, EngineConfig(block_size=8, max_num_batched_tokens=64))
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    results = engine.generate(prompts, params)
    for prompt, m, res in zip(prompts, max_tokens, results):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=m, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert res[0].token_ids == ref, f"{arch}: prompt of {len(prompt)} tokens"
    assert engine.kv.pool.num_used == 0


@torch.inference_mode()
def test_bf16_load_close_to_fp32(tmp_path):
    hf, path = make_hf_model("llama", tmp_path / "m")
    tokens = list(range(3, 40))
    ref = _engine_logits(load_model(path, "float32"), tokens, 1000)
    bf16 = load_model(path, "bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = _engine_logits_dtype(bf16, tokens)
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def _engine_logits_dtype(model, tokens):
    c = model.config
    shape = (16, 4, c.num_kv_heads, c.head_dim)
    caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
              for _ in range(c.num_layers)]
    meta = build_metadata([SeqSlice(0, len(tokens), list(range(16)))], 4, None, torch.device("cpu"))
    return model.compute_logits(model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta,
                                      TorchPagedAttention()))
