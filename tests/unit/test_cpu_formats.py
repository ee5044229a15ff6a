"""float32 on a CPU through oneDNN's linear, and what `dtype: auto` picks on this machine."""
import logging

import pytest
import torch
import torch.nn.functional as F

from llmesh.services.executor.auto_format import BF16_FLAGS, auto_format, cpu_flags
from llmesh.services.executor.attention import TorchPagedAttention, build_metadata, SeqSlice
from llmesh.services.executor.projection import ONEDNN_FLOAT32, Projection, onednn_bfloat16
from llmesh.services.executor.weights import load_model


@pytest.mark.skipif(not ONEDNN_FLOAT32, reason="this torch build has no oneDNN")
def test_float32_projection_is_onednn_within_float32_rounding_of_f_linear():
    torch.manual_seed(0)
    layer = Projection(512, 1536, bias=True)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(64, 512)
    with torch.inference_mode():
        out = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
        direct = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    assert torch.equal(out, direct)  # (the oneDNN call, not F.linear)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # rows of a batch of two or more do not depend on what else is in it
    with torch.inference_mode():
        assert torch.equal(layer(x[:5]), out[:5])


@pytest.mark.skipif(not onednn_bfloat16(), reason="this CPU has no bfloat16 instructions")
def test_bfloat16_projection_is_reordered_once_and_exactly_f_linear(tiny_model_dir):
    model = load_model(tiny_model_dir, "bfloat16")
    layers = [m for m in model.modules() if isinstance(m, Projection)]
    assert layers and all(m.weight is None and m.blocked is not None for m in layers)
    # the LM head tied or not, the embedding keeps its plain weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    layer = Projection(512, 1536, bias=True)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    w, b = layer.weight.detach().bfloat16(), layer.bias.detach().bfloat16()
    layer.weight, layer.bias = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
    layer.reorder_bfloat16()
    x = torch.randn(64, 512).bfloat16()
    with torch.inference_mode():
        out = layer(x)
        assert torch.equal(out, F.linear(x, w, b))
        # a row's result does not depend on what else is in the batch
        assert torch.equal(layer(x[:1]), out[:1]) and torch.equal(layer(x[:7]), out[:7])


def test_single_queries_over_a_bfloat16_cache_attend_in_float32():
    torch.manual_seed(1)
    block, kvh, d, heads = 4, 2, 16, 4
    caches = [torch.randn(32, block, kvh, d).bfloat16() for _ in range(2)]
    seqs = [SeqSlice(9, 1, [3, 7, 1]), SeqSlice(5, 1, [12, 30])]  # decode rows, ragged contexts
    meta = build_metadata(seqs, block, None, torch.device("cpu"))
    q = torch.randn(2, heads, d).bfloat16()
    with torch.inference_mode():
        out = TorchPagedAttention().attend(q, *caches, meta, 0.25)
        wide = TorchPagedAttention().attend(q.float(), caches[0].float(), caches[1].float(), meta, 0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, wide.bfloat16())  # float32 throughout, rounded once


def test_auto_picks_bfloat16_exactly_on_cpus_with_bfloat16_instructions(tiny_model_dir, caplog):
    has_bf16 = bool(cpu_flags() & set(BF16_FLAGS)) and onednn_bfloat16()
    expected = torch.bfloat16 if has_bf16 else torch.float32
    with caplog.at_level(logging.INFO, logger="llmesh.executor"):
        model = load_model(tiny_model_dir, "auto")
    assert model.model.embed_tokens.weight.dtype == expected
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert (qkv.blocked if qkv.weight is None else qkv.weight).dtype == expected
    assert any(f"dtype auto: {'bfloat16' if has_bf16 else 'float32'}" in r.getMessage()
               for r in caplog.records)


def test_auto_keeps_the_checkpoint_dtype_on_a_gpu():
    assert auto_format("float16", "cuda")[0] == "float16"
    assert auto_format("bfloat16", "cuda:1")[0] == "bfloat16"


def test_small_steps_leave_a_core_to_the_host_and_the_count_is_put_back(tiny_model_dir):
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.engine.engine import Engine, EngineConfig
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine.from_pretrained(tiny_model_dir, EngineConfig(max_num_batched_tokens=1024))
        seen = []  # (tokens in the step, torch's threads while its layers ran)
        engine.runner.model.model.layers[0].register_forward_pre_hook(
            lambda mod, args: seen.append((args[0].shape[0], torch.get_num_threads())))
        small_by_work = engine.runner.threads.small_by_work  # (the tiny model: ~850 tokens)
        assert 36 < small_by_work < 900
        engine.generate([[1] + list(range(5, 40))], SamplingParams(max_tokens=4))
        engine.generate([[1] + list(range(1000, 1899))], SamplingParams(max_tokens=2))
        engine.close()
        assert (900, 2) in seen  # a prefill over the work bound: every thread
        assert (36, 1) in seen  # one under it, on this tiny model: one fewer
        assert seen.count((1, 1)) >= 2  # decode steps of one token: one fewer
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
