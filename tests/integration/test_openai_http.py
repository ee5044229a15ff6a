"""The OpenAI-compatible HTTP API through Envoy, driven by the official `openai`
package (and curl and raw HTTP where the SDK hides what is checked)."""
import json
import re
import subprocess
import time
import urllib.request

import grpc
import openai
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import Mesh, serving


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    from llmesh.services.router.tenants import hash_key
    run_dir = tmp_path_factory.mktemp("openai")
    keys = run_dir / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {
        "team": {"keys": [hash_key("k-team")]},
        "tiny": {"keys": [hash_key("k-tiny")], "requests_per_minute": 1}}}))
    m = Mesh(tiny_model_dir, run_dir, observability={"tracing": "off"},
             admission={"keys_file": str(keys)})
    yield from serving(m)


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key="k-team", max_retries=0,
                         timeout=60)


def _grpc_complete(mesh, prompt: str, **sampling) -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(mesh.endpoint) as ch:
        return inference_pb2_grpc.InferenceStub(ch).Complete(
            inference_pb2.GenerateRequest(prompt=prompt,
                                          sampling=common_pb2.SamplingParams(**sampling)),
            timeout=60, metadata=(("authorization", "Bearer k-team"),))


def test_models_and_health(mesh, client):
    assert [m.id for m in client.models.list().data] == ["default"]
    with urllib.request.urlopen(f"http://{mesh.endpoint}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_completion_matches_grpc_greedy(mesh, client):
    out = client.completions.create(model="default", prompt="The lighthouse", max_tokens=8,
                                    temperature=0)
    ref = _grpc_complete(mesh, "The lighthouse", max_tokens=8)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens


def test_stream_concatenates_to_the_whole_response(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Tell a story"}],
              max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_n2_seed_reproducible_and_logprobs(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Hello"}], n=2,
              max_tokens=6, temperature=1.0, seed=1234, logprobs=True, top_logprobs=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    for c in a.choices:
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]


def test_grpc_complete_returns_every_choice(mesh):
    out = _grpc_complete(mesh, "Once", max_tokens=5, n=3, temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.text == out.choices[0].text
    assert out.usage.completion_tokens == sum(len(c.token_ids) for c in out.choices)


def test_stop_string_stream_reports_usage(mesh):
    """A stream that ends on a stop string still reports its usage and timings."""
    ref = _grpc_complete(mesh, "The lighthouse", max_tokens=16)
    stop = ref.text[len(ref.text) // 2:][:3]
    assert stop.strip(), ref.text
    with grpc.insecure_channel(mesh.endpoint) as ch:
        last = list(inference_pb2_grpc.InferenceStub(ch).Generate(
            inference_pb2.GenerateRequest(prompt="The lighthouse", sampling=common_pb2.SamplingParams(
                max_tokens=16, stop=[stop])),
            timeout=60, metadata=(("authorization", "Bearer k-team"),)))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert last.timings.e2e_s > 0


def test_completions_with_several_prompts_and_stop(client):
    out = client.completions.create(model="default", prompt=["A", "B"], n=2, max_tokens=4,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both sequences agree
    one = client.completions.create(model="default", prompt="B", max_tokens=4, temperature=0)
    assert out.choices[2].text == one.choices[0].text


def test_max_tokens_default_runs_to_the_context_or_eos(client):
    out = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], temperature=0,
        extra_body={"ignore_eos": True, "priority": "batch"})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == client.models.retrieve("default").model_extra["max_model_len"]


@pytest.mark.parametrize("body,status,param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, None),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     400, "response_format"),
])
def test_errors_are_openai_json_with_the_right_status(mesh, body, status, param):
    code, headers, payload = _post(mesh, "/v1/chat/completions", body)
    assert code == status, payload
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    if param:
        assert payload["error"]["param"] == param


def test_auth_and_rate_limit_statuses(mesh):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert _post(mesh, "/v1/chat/completions", body, key=None)[0] == 401
    assert _post(mesh, "/v1/chat/completions", body, key="wrong")[0] == 401
    assert _post(mesh, "/v1/chat/completions", body, key="k-tiny")[0] == 200
    code, headers, payload = _post(mesh, "/v1/chat/completions", body, key="k-tiny")
    assert code == 429 and int(headers["retry-after"]) >= 1, payload
    bad = openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
    assert _post(mesh, "/v1/nothing", body)[0] == 404
    assert _post(mesh, "/v1/completions", b"{not json")[0] == 400


def test_curl_sees_one_event_per_token(mesh):
    """`curl -N` through Envoy: events arrive one at a time, not in one buffered block."""
    body = json.dumps({"model": "default", "prompt": "The lighthouse", "max_tokens": 24,
                       "temperature": 0, "stream": True, "ignore_eos": True,
                       "extra_body": None})
    proc = subprocess.Popen(
        ["curl", "-sN", "-H", "Authorization: Bearer k-team", "-H", "Content-Type: application/json",
         "-d", body, f"http://{mesh.endpoint}/v1/completions"], stdout=subprocess.PIPE)
    arrivals, events = [], []
    try:
        for line in proc.stdout:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                events.append(line[6:].strip())
    finally:
        proc.wait(timeout=30)
    assert events[-1] == b"[DONE]"
    tokens = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert len(tokens) >= 12  # one event per decode step, not one blob
    assert len(set(round(t, 3) for t in arrivals)) > len(arrivals) // 2  # spread in time


def _post(mesh, path, body, key="k-team"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{mesh.endpoint}{path}", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_an_error_mid_stream_is_an_event_that_says_incomplete(mesh, client):
    """The deadline passes mid-stream: tokens arrive, then an error event saying
    the output is incomplete and why (the SDK raises it), then [DONE]."""
    body = {"model": "default", "prompt": "The lighthouse", "max_tokens": 1500,
            "ignore_eos": True, "temperature": 0, "stream": True, "timeout_ms": 700}
    req = urllib.request.Request(f"http://{mesh.endpoint}/v1/completions",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer k-team"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["incomplete"] is True
    assert last["error"]["incomplete_reason"] == "deadline exceeded"
    assert last["error"]["type"] == "timeout"
    assert len(events) > 3 and all("choices" in json.loads(e) for e in events[:-2])
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in client.completions.create(stream=True, **{k: v for k, v in body.items()
                                                           if k in ("model", "prompt", "max_tokens")},
                                           extra_body={"ignore_eos": True, "timeout_ms": 700}):
            pass


def test_fuzzed_bodies_never_get_a_500(mesh):
    """Random JSON bodies (wrong types, huge values, odd strings) and bad bytes: every
    answer is a status below 500 (or a clean 503/504), never a crash."""
    from hypothesis import HealthCheck, example, given, settings, strategies as st
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=False), st.text(max_size=20))
    anything = st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=12)
    small_int = st.one_of(st.integers(-3, 6), st.just(10**12), st.text(max_size=3), st.none())
    message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system",
                                                                       "assistant"]), anything),
                                     "content": st.one_of(st.text(max_size=30), anything)})
    body = st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.just("default"), anything), "messages": st.one_of(
            st.lists(message, min_size=1, max_size=3), anything),
        "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 5000), max_size=5),
                            anything),
        "max_tokens": small_int, "n": small_int, "temperature": anything, "top_p": anything,
        "stop": anything, "seed": anything, "logprobs": anything, "top_logprobs": small_int,
        "stream": st.booleans(), "stream_options": anything, "response_format": anything,
        "presence_penalty": anything, "user": anything, "priority": anything})
    statuses = []

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=body,
           raw=st.one_of(st.none(), st.binary(max_size=40)))
    @example(path="/v1/chat/completions", raw=None, body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    @example(path="/v1/completions", raw=None, body={"prompt": [5, 6], "max_tokens": 2, "n": 2})
    def check(path, body, raw):
        payload = raw if raw is not None else json.dumps(body).encode()
        code = _post_raw(mesh, path, payload)
        statuses.append(code)
        assert code < 500 or code in (503, 504), (code, payload)
    check()
    payload = b'{"prompt": "caf\xc3\x28", "max_tokens": 2}'  # invalid UTF-8 inside a string
    assert _post_raw(mesh, "/v1/completions", payload) == 400
    assert 200 in statuses and 400 in statuses
    with urllib.request.urlopen(f"http://{mesh.endpoint}/health", timeout=10) as r:
        assert r.status == 200  # nothing crashed


def _post_raw(mesh, path, payload: bytes) -> int:
    req = urllib.request.Request(f"http://{mesh.endpoint}{path}", data=payload, method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer k-team"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def test_json_schema_responses_always_conform(client):
    """200 requests to the random-weight tiny model: every answer is JSON that
    conforms to the schema, because the constraint forces it."""
    from concurrent.futures import ThreadPoolExecutor
    from structured_checks import SCHEMA, conforms

    def ask(i):
        out = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"item {i}"}],
            max_tokens=120, seed=i, extra_body={"priority": "batch"}, response_format={
                "type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}})
        return out.choices[0]
    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(200)))
    assert all(c.finish_reason == "stop" for c in choices)
    assert all(conforms(c.message.content) for c in choices), \
        [c.message.content for c in choices if not conforms(c.message.content)][:3]


def test_grpc_regex_and_a_bad_schema(mesh):
    out = _grpc_complete(mesh, "Answer", max_tokens=30, temperature=1.0, seed=4,
                         structured=common_pb2.StructuredOutput(regex=r"(yes|no)!"))
    assert out.text in ("yes!", "no!")
    code, _, payload = _post(mesh, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}})
    assert code == 400 and payload["error"]["param"] == "response_format"


def test_json_fragments_stream_each_completed_value(mesh):
    """`stream_options.json_fragments`: one event per completed member (list members
    element by element), each parsing alone, then the finish chunk and [DONE]."""
    from structured_checks import SCHEMA, conforms
    body = {"model": "default", "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 120, "seed": 9, "stream": True,
            "stream_options": {"json_fragments": True},
            "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
    req = urllib.request.Request(f"http://{mesh.endpoint}/v1/chat/completions",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer k-team"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    fragments = [json.loads(e) for e in events[:-1] if json.loads(e)["object"] == "json.fragment"]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    rebuilt = {}
    for f in fragments:
        key = f["path"][2:].split("[")[0]
        if "[" in f["path"]:
            rebuilt.setdefault(key, []).append(f["value"])
        else:
            rebuilt[key] = f["value"]
    assert [f["path"].split("[")[0] for f in fragments if "[" not in f["path"]][:3] == \
        ["$.name", "$.ok", "$.size"]
    assert conforms(json.dumps(rebuilt)), fragments
    code, _, payload = _post(mesh, "/v1/chat/completions", {**body, "response_format": None})
    assert code == 400 and payload["error"]["param"] == "stream_options"


def test_several_prompts_stream_together(client):
    """A completions stream over two prompts merges both (choice index = prompt * n
    + sequence) and equals the whole response."""
    kw = dict(model="default", prompt=["The", "A lighthouse"], n=2, max_tokens=5, temperature=0)
    whole = client.completions.create(**kw)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2, 3}
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_vllm_style_guided_choice_and_regex(client):
    """Clients written for vLLM's guided_* extensions work unchanged."""
    for seed in range(5):
        out = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "pick"}], seed=seed,
            max_tokens=20, extra_body={"guided_choice": ["red", "green", "blue"]})
        assert out.choices[0].message.content in ("red", "green", "blue")
    out = client.completions.create(model="default", prompt="code:", max_tokens=20, seed=1,
                                    extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", out.choices[0].text), out.choices[0].text
