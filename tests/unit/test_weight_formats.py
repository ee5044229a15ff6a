"""CPU weight formats: int8 (per-channel weights, per-token activations, fbgemm)
and float16 weights. They stay close to float32, take a quarter / half of the
projection bytes, and a token's result does not depend on what else is batched."""
import random

import pytest
import torch

from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.executor.projection import (PACKED_FORMATS, Projection, check_packed_format,
                                          projection_bytes)
from llmesh.services.executor.weights import load_model
from tp_worker import teacher_forced_logits

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="the packed formats need fbgemm (x86)")

# measured on the tiny model: float16 weights 3e-4 of the largest logit, int8 2.5e-2
MAX_LOGIT_ERROR = {"float16-weights": 2e-3, "int8": 6e-2}
MIN_TOP1_AGREEMENT = {"float16-weights": 1.0, "int8": 0.85}


@pytest.fixture(scope="module")
def prompt(tiny_model):
    rng = random.Random(7)
    return [1] + [rng.randrange(2, tiny_model.config.vocab_size) for _ in range(70)]


@pytest.fixture(scope="module")
def reference_logits(tiny_model, prompt):
    with torch.inference_mode():
        return teacher_forced_logits(tiny_model, prompt, chunk=24)


@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_logits_stay_close_to_float32(fmt, tiny_model_dir, tiny_model, prompt, reference_logits):
    model = load_model(tiny_model_dir, fmt)
    assert all(m.format == fmt for m in model.modules() if isinstance(m, Projection))
    with torch.inference_mode():
        logits = teacher_forced_logits(model, prompt, chunk=24)
    ref = reference_logits
    error = (logits - ref).abs().max().item() / ref.abs().max().item()
    assert 0 < error < MAX_LOGIT_ERROR[fmt]
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= MIN_TOP1_AGREEMENT[fmt]
    # the projections hold a quarter (int8) or half (float16) of their float32 bytes
    assert projection_bytes(model) * (4 if fmt == "int8" else 2) == projection_bytes(tiny_model)


def test_int8_result_of_a_token_does_not_depend_on_its_batch():
    """A loud row in the batch must not coarsen another row's quantization."""
    torch.manual_seed(0)
    layer = Projection(64, 48, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.1)
    w, b = layer.weight.clone(), layer.bias.clone()
    layer.pack("int8")
    quiet = torch.randn(3, 64)
    loud = torch.randn(5, 64) * 50
    alone = layer(quiet)
    batched = layer(torch.cat([loud[:2], quiet, loud[2:]]))[2:5]
    assert torch.equal(alone, batched)
    expect = quiet @ w.T + b
    assert ((alone - expect).abs().max() / expect.abs().max()).item() < 0.03


@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_engine_generates_the_same_tokens_alone_and_batched(fmt, tiny_model_dir):
    """Greedy output of a request is the same alone as in a batch of others
    (the per-token scales make int8 batch-invariant)."""
    engine = Engine.from_pretrained(tiny_model_dir, EngineConfig(dtype=fmt, num_kv_blocks=256))
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(2, 500) for _ in range(n)] for n in (9, 40, 3, 25)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    batched = [c[0].token_ids for c in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0][0].token_ids for p in prompts]
    assert batched == alone and all(len(t) == 16 for t in batched)
    engine.close()


def test_unknown_or_misplaced_formats_are_refused(tiny_model_dir):
    with pytest.raises(UnsupportedModelError, match="int8"):
        load_model(tiny_model_dir, "int4")  # the message lists the choices
    with pytest.raises(UnsupportedModelError, match="CPU only"):
        check_packed_format("int8", torch.device("cuda"))
    with pytest.raises(UnsupportedModelError, match="unknown weight format"):
        Projection(4, 4).pack("int3")
