"""Decode steps replayed from CUDA graphs give the eager path's tokens (GPU only)."""
import contextlib
import random

import pytest
import torch

from hf_models import make_hf_model
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.cuda_graphs import graph_batch_sizes

MAX_SEQS = 12  # graphs for batches 1, 2, 4, 8 and 12
GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # head_dim 64 in bf16: the shape the kernel backend (and so the graphs) serve
    _, path = make_hf_model("llama", tmp_path_factory.mktemp("graphs") / "m", head_dim=64)
    eng = Engine.from_pretrained(path, EngineConfig(
        device="cuda", dtype="bfloat16", max_num_seqs=MAX_SEQS, max_num_batched_tokens=4096,
        num_kv_blocks=512))
    assert eng.runner.graphs is not None
    assert eng.runner.graphs.sizes == graph_batch_sizes(MAX_SEQS) == [1, 2, 4, 8, 12]
    yield eng
    eng.close()


def _prompts(n, seed, vocab=320):
    rng = random.Random(seed)
    return [[1] + rng.choices(range(3, vocab), k=rng.randint(5, 150)) for _ in range(n)]


def _run(engine, prompts, params, eager: bool):
    """Every choice's tokens, and how many graph replays the run made."""
    graphs = engine.runner.graphs
    before = graphs.num_replays
    with engine.runner.eager() if eager else contextlib.nullcontext():
        out = engine.generate(prompts, params)
    return [[c.token_ids for c in r] for r in out], graphs.num_replays - before


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("size", graph_batch_sizes(MAX_SEQS))
def test_graphed_decode_equals_eager_at_every_captured_size(engine, size, params):
    # all prompts prefill in one step, then every decode step runs `size` sequences:
    # the graph of exactly that size, against eager steps of the same batch
    prompts = _prompts(size, seed=size)
    graphed, replays = _run(engine, prompts, params, eager=False)
    eager, no_replays = _run(engine, prompts, params, eager=True)
    assert replays >= params.max_tokens - 1 and no_replays == 0
    assert graphed == eager


def test_a_batch_that_shrinks_and_grows_replays_correctly(engine):
    # 30 requests over 12 slots with different lengths: sequences finish and others
    # are admitted, so decode batches shrink and grow (padded to the next graph)
    rng = random.Random(3)
    prompts = _prompts(30, seed=99)
    params = [SamplingParams(max_tokens=rng.randint(2, 40), ignore_eos=True) for _ in prompts]
    graphed, replays = _run(engine, prompts, params, eager=False)
    eager, _ = _run(engine, prompts, params, eager=True)
    assert replays > 0
    assert [len(g[0]) for g in graphed] == [p.max_tokens for p in params]
    # padded rows write no KV and real rows see only their own: a slot clobbered by
    # padding would derail many sequences; a GEMM of another row count may round a
    # bf16 near-tie the other way in one
    same = sum(a == b for a, b in zip(graphed, eager))
    assert same >= len(prompts) - 1, (same, len(prompts))


def test_n_gt_1_forks_and_logprobs_through_graphs(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=11, n=3,
                            logprobs=2)
    prompts = _prompts(3, seed=5)
    graphed, replays = _run(engine, prompts, params, eager=False)
    eager, _ = _run(engine, prompts, params, eager=True)
    assert replays > 0 and graphed == eager
    assert all(len(choices) == 3 for choices in graphed)


def test_graphs_stay_off_where_they_cannot_run(tmp_path):
    _, path = make_hf_model("llama", tmp_path / "m", head_dim=64)
    fp32 = Engine.from_pretrained(path, EngineConfig(device="cuda", num_kv_blocks=64))
    assert fp32.runner.graphs is None  # the torch backend (fp32): eager
    fp32.close()
    off = Engine.from_pretrained(path, EngineConfig(device="cuda", dtype="bfloat16",
                                                    num_kv_blocks=64, cuda_graphs=False))
    assert off.runner.graphs is None
    off.close()
    torch.cuda.empty_cache()
