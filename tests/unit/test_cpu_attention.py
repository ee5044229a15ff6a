"""The compiled decode attention for 16-bit caches on a CPU (attention_cpu.py) against
the reference backend, on ragged paged caches, and the runner's choice of it."""
import random

import pytest
import torch

from llmesh.services.executor.attention import TorchPagedAttention, build_metadata, SeqSlice
from llmesh.services.executor.attention_cpu import (MIN_COMPILED_KEYS, CompiledCpuAttention,
                                                    compiler_missing)
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.weights import load_model

BLOCK, KV_HEADS, HEAD_DIM, HEADS = 16, 2, 16, 6
LONG = [9, 300, 2, 170, 45, 260, 33, 120]  # 8 ragged rows, 19 blocks wide: compiled


@pytest.fixture(scope="module")
def backend():
    b = CompiledCpuAttention()
    caches = torch.zeros(8, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    b.warm_up(caches, caches.clone(), HEADS, HEAD_DIM ** -0.5)
    return b


def _step(rng, contexts, prefills=()):
    """Caches with random keys and values, a step's metadata (single queries with these
    contexts first, then prefill chunks of these lengths) and its queries."""
    caches = [torch.randn(256, BLOCK, KV_HEADS, HEAD_DIM).bfloat16() for _ in range(2)]
    free = list(range(256))
    rng.shuffle(free)
    seqs = []
    for ctx in contexts:
        blocks = [free.pop() for _ in range(ctx // BLOCK + 1)]
        seqs.append(SeqSlice(ctx, 1, blocks))
    for n in prefills:
        seqs.append(SeqSlice(0, n, [free.pop() for _ in range(-(-n // BLOCK))]))
    q = torch.randn(sum(s.num_new for s in seqs), HEADS, HEAD_DIM).bfloat16()
    return caches, seqs, q


@pytest.mark.parametrize("contexts,prefills", [
    (LONG, ()),  # ragged decode rows, through the compiled loops
    (LONG, (5, 40)),  # decode rows then prefill chunks
    ([13], ()),  # one row: eager
    ([30, 1], ()),  # a small step: eager
])
def test_decode_rows_match_the_reference_backend(backend, contexts, prefills):
    rng = random.Random(len(contexts) * 7 + len(prefills))
    caches, seqs, q = _step(rng, contexts, prefills)
    meta_ref = build_metadata(seqs, BLOCK, None, torch.device("cpu"))
    meta = build_metadata(seqs, BLOCK, None, torch.device("cpu"), with_block_tables=True)
    rows, width = meta.single_block_tables.shape
    assert (rows * width * BLOCK >= MIN_COMPILED_KEYS) == (contexts is LONG)
    with torch.inference_mode():
        want = TorchPagedAttention().attend(q, *caches, meta_ref, HEAD_DIM ** -0.5)
        got = backend.attend(q, *caches, meta, HEAD_DIM ** -0.5)
    assert got.dtype == torch.bfloat16
    # both in float32 and rounded once: at most a rounding step apart
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got.float() - want.float()).abs().max() <= 8e-3


@pytest.mark.skipif(compiler_missing() is not None, reason="no C++ compiler for inductor")
def test_compiled_and_eager_maths_agree(backend):
    caches, seqs, q = _step(random.Random(3), LONG)
    meta = build_metadata(seqs, BLOCK, None, torch.device("cpu"), with_block_tables=True)
    tables, lens = meta.single_block_tables.long(), meta.single_context_lens.long()
    with torch.inference_mode():
        compiled = backend._decode(q, *caches, tables, lens, 0.25)
        eager = backend._eager_single(q, *caches, tables, lens, 0.25)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(compiler_missing() is not None, reason="no C++ compiler for inductor")
def test_it_compiles_here_and_a_bfloat16_cpu_runner_uses_it(backend, tiny_model_dir):
    assert backend.compiled and backend.why_eager is None
    bf16 = ModelRunner(load_model(tiny_model_dir, "bfloat16"), 32, 16)
    assert isinstance(bf16.backend, CompiledCpuAttention) and bf16.backend.compiled
    # float32 keeps the reference backend (there the compiled loops were slower)
    assert type(ModelRunner(load_model(tiny_model_dir, "float32"), 32, 16).backend) \
        is TorchPagedAttention


def test_turned_off_it_runs_eagerly(monkeypatch):
    monkeypatch.setenv("LLMESH_COMPILED_CPU_ATTENTION", "0")
    b = CompiledCpuAttention()
    caches = torch.zeros(8, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    b.warm_up(caches, caches.clone(), HEADS, 0.25)
    assert not b.compiled and "LLMESH_COMPILED_CPU_ATTENTION=0" in b.why_eager
    # it then asks for the reference backend's grouped inputs and attends as that does
    assert not b.wants_block_tables
    caches, seqs, q = _step(random.Random(5), LONG, (4,))
    meta = build_metadata(seqs, BLOCK, None, torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(b.attend(q, *caches, meta, 0.25),
                           TorchPagedAttention().attend(q, *caches, meta, 0.25))
