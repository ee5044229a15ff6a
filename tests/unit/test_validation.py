"""Every bad request is a typed error naming the field, and nothing is allocated."""
import pytest

from llmesh.services.common.errors import DuplicateRequestError, InvalidRequestError
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig


@pytest.fixture
def engine(tiny_model):
    return Engine(tiny_model, EngineConfig(max_model_len=256, num_kv_blocks=32, block_size=16))


BAD = [
    ([], {}, "prompt_token_ids"),
    ([1, 2, 99999], {}, "prompt_token_ids"),
    ([1, -1], {}, "prompt_token_ids"),
    ([1, "a"], {}, "prompt_token_ids"),
    ([1] * 256, {}, "prompt_token_ids"),  # prompt as long as the context
    ([1] * 300, {}, "prompt_token_ids"),
    ([1] * 200, {"max_tokens": 57}, "max_tokens"),  # past the context
    ([1], {"max_tokens": 0}, "max_tokens"),
    ([1], {"max_tokens": 2.5}, "max_tokens"),
    ([1], {"temperature": -0.1}, "temperature"),
    ([1], {"temperature": float("nan")}, "temperature"),
    ([1], {"top_p": 0.0}, "top_p"),
    ([1], {"top_p": 1.5}, "top_p"),
    ([1], {"top_k": -1}, "top_k"),
    ([1], {"min_p": 1.1}, "min_p"),
    ([1], {"repetition_penalty": 0.0}, "repetition_penalty"),
    ([1], {"presence_penalty": 3.0}, "presence_penalty"),
    ([1], {"frequency_penalty": -2.5}, "frequency_penalty"),
    ([1], {"seed": -5}, "seed"),
    ([1], {"n": 0}, "n"),
    ([1], {"n": 100}, "n"),
    ([1], {"logprobs": 50}, "logprobs"),
    ([1], {"stop_token_ids": (5, 4000)}, "stop_token_ids"),
]


@pytest.mark.parametrize("prompt,params,field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_names_field_and_allocates_nothing(engine, prompt, params, field):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, SamplingParams(**params))
    assert info.value.field == field
    assert field in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"
    assert not engine.has_unfinished()
    assert engine.kv.pool.num_used == 0
    assert engine.step() == []  # nothing queued


def test_request_larger_than_the_whole_cache(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=4, block_size=16))
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([1] * 40, SamplingParams(max_tokens=30))
    assert info.value.field == "max_tokens" and "KV cache" in str(info.value)
    assert not engine.has_unfinished()


def test_duplicate_request_id(engine):
    engine.add_request([1, 2], request_id="x")
    with pytest.raises(DuplicateRequestError):
        engine.add_request([1, 2], request_id="x")
    assert len(engine.scheduler.waiting) == 1


def test_valid_edge_values_are_accepted(engine):
    engine.add_request([1] * 200, SamplingParams(max_tokens=56, top_p=1.0, min_p=1.0, top_k=5000,
                                                 temperature=2.0, logprobs=20, n=16))
    assert engine.has_unfinished()
