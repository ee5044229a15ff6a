"""Tensor parallelism on CPU (gloo): TP=2 matches TP=1 and halves the weights per rank.

Each configuration runs in real processes (tests/tp_worker.py): one TP=1 process,
and two ranks forming a gloo group on a loopback port picked at run time.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import make_hf_model
from llmesh.mesh.ports import free_port
from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.executor.model_config import load_model_config
from llmesh.services.executor.parallel import check_shardable, kv_head_range, vocab_range

WORKER = Path(__file__).resolve().parents[1] / "tp_worker.py"
LOGIT_ATOL = 1e-4  # fp32; only the order of the all-reduce sums differs
# Weights per rank at TP=2 over TP=1: the sharded matrices halve; the norms and,
# when there are fewer KV heads than ranks, the k/v projections are replicated.
WEIGHT_RATIO_TOLERANCE = 0.05


def _run(world_size: int, models: list[Path], out_dir: Path) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for rank in range(world_size):
        out = out_dir / f"tp{world_size}-rank{rank}.json"
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(rank), "--world-size", str(world_size),
             "--dist-addr", f"127.0.0.1:{port}", "--out", str(out), *map(str, models)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    try:
        for p in procs:
            log, _ = p.communicate(timeout=240)
            assert p.returncode == 0, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(o.read_text()) for o in outs]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tp")
    models = {
        "tiny": Path(tiny_model_dir),  # 4 heads, 2 KV heads: one KV head per rank
        # GQA with fewer KV heads than ranks: the single KV head is replicated
        "llama-1kv": make_hf_model("llama", root / "llama-1kv", num_kv_heads=1)[1],
        # q/k/v biases, and a vocabulary that does not split evenly (padded last shard)
        "qwen2-oddvocab": make_hf_model("qwen2", root / "qwen2", vocab_size=321)[1],
        "llama-tied": make_hf_model("llama-tied", root / "llama-tied")[1],
    }
    paths = list(models.values())
    (tp1,) = _run(1, paths, root)
    rank0, rank1 = _run(2, paths, root)
    return {name: (tp1[str(p)], rank0[str(p)], rank1[str(p)]) for name, p in models.items()}


NAMES = ["tiny", "llama-1kv", "qwen2-oddvocab", "llama-tied"]


@pytest.mark.parametrize("name", NAMES)
def test_tp2_logits_match_tp1(tp_results, name):
    tp1, rank0, rank1 = tp_results[name]
    a, b = torch.tensor(tp1["logits"]), torch.tensor(rank0["logits"])
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < LOGIT_ATOL
    assert rank1["logits"] is None  # only rank 0 holds full logits


@pytest.mark.parametrize("name", NAMES)
def test_tp2_tokens_match_tp1(tp_results, name):
    tp1, rank0, rank1 = tp_results[name]
    # six concurrent greedy requests, chunked prefill, and seeded sampling with n=2
    assert rank0["greedy"] == tp1["greedy"]
    assert rank0["seeded"] == tp1["seeded"]
    # the other rank's sequences were extended with the same (broadcast) tokens
    assert rank1["greedy"] == tp1["greedy"] and rank1["seeded"] == tp1["seeded"]
    assert all(len(c[0]) == 12 for c in tp1["greedy"])
    # structured output: rank 0 holds the grammar and masks; both ranks take its tokens
    assert rank0["structured"] == rank1["structured"] == tp1["structured"]


@pytest.mark.parametrize("name", NAMES)
def test_tp2_int8_stays_close_to_float32(tp_results, name):
    """int8 weights shard like float ones; each row-parallel rank quantizes its own
    slice of the activations, so TP=2 is close to TP=1, not identical."""
    tp1, rank0, rank1 = tp_results[name]
    ref = torch.tensor(tp1["logits"])
    one, two = torch.tensor(tp1["int8_logits"]), torch.tensor(rank0["int8_logits"])
    # int8's own error at TP=1 (2-12% of the largest logit on these small random models)
    error_tp1 = (one - ref).abs().max().item()
    assert 0 < error_tp1 < 0.15 * ref.abs().max().item()
    assert (two - ref).abs().max().item() < 1.5 * error_tp1
    assert (two - one).abs().max().item() < 1.5 * error_tp1
    assert rank1["int8_logits"] is None and rank0["int8_greedy"] == rank1["int8_greedy"]
    assert all(len(c[0]) == 8 for c in rank0["int8_greedy"])


@pytest.mark.parametrize("name", NAMES)
def test_tp2_weights_per_rank_about_half(tp_results, name, tiny_model_dir):
    tp1, rank0, rank1 = tp_results[name]
    for rank in (rank0, rank1):
        ratio = rank["weight_bytes"] / tp1["weight_bytes"]
        assert abs(ratio - 0.5) <= WEIGHT_RATIO_TOLERANCE + _replicated_share(name), (name, ratio)


def _replicated_share(name: str) -> float:
    # llama-1kv: k/v projections (2 x 16 x 64 per layer of the 4-head model) stay whole
    return 0.05 if name == "llama-1kv" else 0.0


def test_kv_heads_sharded_or_replicated(tp_results):
    assert tp_results["tiny"][1]["kv_heads_per_rank"] == 1
    assert tp_results["llama-1kv"][1]["kv_heads_per_rank"] == 1
    assert kv_head_range(8, 2, 1) == (4, 4)
    assert kv_head_range(2, 4, 3) == (1, 1)  # ranks 2 and 3 share KV head 1
    assert vocab_range(321, 2, 1) == (161, 322)


def test_unshardable_config_is_refused(tiny_model_dir):
    config = load_model_config(tiny_model_dir)  # 4 heads, 2 KV heads, 192 intermediate
    check_shardable(config, 4)
    with pytest.raises(UnsupportedModelError, match="tensor_parallel=3"):
        check_shardable(config, 3)
