"""The CUDA graph ladder, and where graphs stay off (the capture itself is GPU-only:
tests/gpu/test_cuda_graphs_gpu.py)."""
import pytest

from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.cuda_graphs import graph_batch_sizes


@pytest.mark.parametrize("max_batch, sizes", [
    (1, [1]), (2, [1, 2]), (12, [1, 2, 4, 8, 12]), (16, [1, 2, 4, 8, 16]),
    (40, [1, 2, 4, 8, 16, 32, 40]), (64, [1, 2, 4, 8, 16, 32, 48, 64])])
def test_ladder(max_batch, sizes):
    assert graph_batch_sizes(max_batch) == sizes


def test_every_batch_up_to_the_max_has_a_graph_with_little_padding():
    sizes = graph_batch_sizes(256)
    for n in range(1, 257):
        padded = next(b for b in sizes if b >= n)
        assert padded - n < max(16, n // 4 + 1)


def test_the_cpu_runner_has_no_graphs(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=32))
    assert engine.runner.graphs is None
    with engine.runner.eager():  # (a no-op here, but the same call works)
        out = engine.generate([[1, 5, 9]])
    assert len(out[0][0].token_ids) > 0
    engine.close()
