"""The whole-forward CPU decode kernel on a float32 model (kernels/cpu_decode.cpp,
built by g++ here): against the eager float32 forward it differs only in the order
of float32 sums (a few float32 roundings), writes the same K/V to the same slots,
gives each row the same bits in any batch and on any team, reads the model's own
weights (no copy), and the runner takes it for small decode steps with the
reference attention backend, token for token the eager steps' greedy choices."""
import numpy as np
import pytest
import torch

from llmesh.kernels import cpu_decode
from unit.test_cpu_decode_kernel import (BLOCK, SHAPES, assert_team_invariant, caches, eager,
                                         kernel_for, native, random_model, step_inputs)

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU decode kernel: {cpu_decode.unavailable()}")


def float32_model(**overrides):
    model = random_model(**overrides).float()
    model.init_rope(torch.device("cpu"))
    return model


@pytest.mark.parametrize("shape,block", [(shape, BLOCK) for shape in SHAPES] + [("gqa2-d32", 8)])
def test_it_is_the_eager_float32_forward_to_a_few_roundings(shape, block):
    model = float32_model(**SHAPES[shape])
    contexts = [1, 16, 17, 40, 203] if block == BLOCK else [1, 8, 9, 31, 70]
    ids, starts, counts, table, blocks = step_inputs(contexts, block=block)
    kv_eager = caches(model, blocks, torch.float32, block=block)
    kv_native = caches(model, blocks, torch.float32, block=block)
    h_eager = eager(model, ids, starts, counts, table, kv_eager, block)
    step = kernel_for(model, kv_native, block)
    h_native = native(step, ids, starts, counts, table, block)
    assert h_native.dtype == torch.float32
    scale = h_eager.abs().max().item()
    assert (h_native - h_eager).abs().max().item() <= 2 ** -17 * scale
    with torch.inference_mode():
        logits_eager, logits_native = model.compute_logits(h_eager), step.logits(h_native)
    assert (logits_native - logits_eager).abs().max() <= 2 ** -17 * logits_eager.abs().max()
    assert torch.equal(logits_native.argmax(-1), logits_eager.argmax(-1))
    slots = (table[np.arange(len(contexts)), starts // block] * block + starts % block).tolist()
    for (ke, ve), (kn, vn) in zip(kv_eager, kv_native):
        for cache_e, cache_n in ((ke, kn), (ve, vn)):
            flat_e, flat_n = cache_e.flatten(0, 1), cache_n.flatten(0, 1)
            written = torch.zeros(flat_e.shape[0], dtype=torch.bool)
            written[slots] = True
            assert torch.equal(flat_e[~written], flat_n[~written])  # nothing else touched
            diff = (flat_e[slots] - flat_n[slots]).abs().max().item()
            assert diff <= 2 ** -17 * flat_e[slots].abs().max().item()


def test_each_row_is_the_same_bits_in_any_batch_and_on_any_team():
    model = float32_model(**SHAPES["gqa4-d64-bias"])
    contexts = [5, 33, 64, 90, 129, 7]
    h1 = assert_team_invariant(model, torch.float32, contexts)
    ids, starts, counts, table, blocks = step_inputs(contexts)
    step = kernel_for(model, caches(model, blocks, torch.float32))
    for i in (0, 3, 5):
        one = native(step, ids[i:i + 1], starts[i:i + 1], counts[i:i + 1], table[i:i + 1])
        assert torch.equal(one[0], h1[i])


@pytest.mark.parametrize("rows,width,bias", [(3000, 512, False), (1000, 96, True), (7, 64, False)])
def test_the_float32_product_is_f_linear_to_a_few_roundings(rows, width, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, width, generator=g) * width ** -0.5
    b = torch.randn(rows, generator=g) if bias else None
    x = torch.randn(6, width, generator=g)
    layout = cpu_decode.pack_rows(w)
    assert layout.data_ptr() == w.data_ptr()  # the weight itself
    got = cpu_decode.product(layout, b, rows, x, 2)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (6, rows) and got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= 1e-5 * (exact.abs() + 1)).all()
    assert torch.equal(cpu_decode.product(layout, b, rows, x, 1), got)
    for i in (0, 5):
        assert torch.equal(cpu_decode.product(layout, b, rows, x[i:i + 1], 1)[0], got[i])
    with pytest.raises(ValueError, match="packed"):
        cpu_decode.product(layout, b, rows + 1, x, 1)
    with pytest.raises(ValueError, match="packed"):
        cpu_decode.product(cpu_decode.pack_rows(w.bfloat16()), b, rows, x, 1)
    with pytest.raises(ValueError, match="bias"):  # (a strided bias would be read past its end)
        cpu_decode.product(layout, torch.zeros(1).expand(rows), rows, x, 1)


def test_a_loaded_float32_model_shares_its_weights_with_the_kernel(tmp_path):
    from llmesh.mesh.default_model import make_tiny
    from llmesh.services.executor.cpu_decode_step import is_packed
    from llmesh.services.executor.weights import load_model
    path = make_tiny(tmp_path / "bench", preset="bench")
    model = load_model(path, "float32")
    assert is_packed(model)
    for layer in model.model.layers:
        for proj in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
            assert proj.decode_rows.data_ptr() == proj.weight.data_ptr()
    assert not is_packed(load_model(path, "float32", cpu_decode_kernel=False))


def test_the_runner_takes_it_with_the_reference_backend_and_keeps_the_greedy_tokens():
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan
    from llmesh.services.executor.attention import TorchPagedAttention
    from llmesh.services.executor.cpu_decode_step import MAX_ROWS, pack_model
    from llmesh.services.executor.runner import ModelRunner
    model = float32_model(**SHAPES["gqa4-d64-bias"])
    pack_model(model)
    params = SamplingParams(max_tokens=64, temperature=0.0)
    streams = []
    for use_kernel in (True, False):
        runner = ModelRunner(model, 64, BLOCK)
        assert isinstance(runner.backend, TorchPagedAttention)
        assert not runner.backend.wants_block_tables and runner.cpu_decode is not None
        n = 3
        new = [NewSequence(seq_id=f"s{i}", token_ids=[3 + i, 7, 9, 11 * i + 5],
                           num_prompt_tokens=4, params=params, index=0, num_computed=0,
                           block_ids=[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3])
               for i in range(n)]
        tokens = {f"s{i}": [] for i in range(n)}

        def step(step_id, seqs, fresh=()):
            plan = StepPlan(step_id=step_id, new=list(fresh),
                            scheduled=[ScheduledSequence(s, k, 4, []) for s, k in seqs])
            for seq_id, sampled in runner.execute(plan).sampled.items():
                tokens[seq_id] += sampled
        step(1, [(f"s{i}", 4) for i in range(n)], new)
        for k in range(2, 40):  # 38 decode steps of 3 rows
            if use_kernel:
                step(k, [(f"s{i}", 1) for i in range(n)])
            else:
                with runner.eager():
                    step(k, [(f"s{i}", 1) for i in range(n)])
        assert n <= MAX_ROWS and runner.cpu_decode.num_steps == (38 if use_kernel else 0)
        streams.append(tokens)
    assert streams[0] == streams[1]
    assert len(set(streams[0]["s0"])) > 3  # (not one token repeated)
