"""The HTTP API's edges without a mesh: request bodies -> GenerateRequest, and the
SSE stream's events (heartbeats while idle, an error event that says the output
is incomplete, usage over every sequence and prompt). The mesh tests drive the
whole path through Envoy (tests/integration/test_openai_http.py)."""
import asyncio
import json

import pytest

from llmesh.v1 import common_pb2, inference_pb2
from llmesh.services.router.http_api.errors import ApiError
from llmesh.services.router.http_api.requests import parse_chat, parse_completion
from llmesh.services.router.http_api.responses import Formatter
from llmesh.services.router.http_api.streams import _END, DONE, HEARTBEAT, SseStream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_chat_defaults_follow_openai():
    p = parse_chat(CHAT, {})
    s = p.requests[0].sampling
    assert s.temperature == 1.0 and s.max_tokens == 0  # 0: up to the end of the context
    assert not p.stream and p.logprobs is None and p.n == 1
    assert parse_completion({"prompt": "x"}, {}).requests[0].sampling.max_tokens == 16


def test_chat_fields_map_to_the_grpc_request():
    p = parse_chat({**CHAT, "max_completion_tokens": 7, "temperature": 0, "stop": "\n",
                    "seed": -1, "n": 2, "logprobs": True, "top_logprobs": 3,
                    "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "developer", "content": [
                        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
                   {"x-llmesh-priority": "batch"})
    req = p.requests[0]
    assert (req.sampling.max_tokens, req.sampling.temperature, list(req.sampling.stop)) == \
        (7, 0.0, ["\n"])
    assert req.sampling.seed == 2**63 - 1  # any int64 seed maps into range
    assert (p.n, p.logprobs, p.stream, p.include_usage) == (2, 3, True, True)
    assert req.sampling.logprobs == 3 and req.priority == common_pb2.PRIORITY_BATCH
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "ab")]


def test_several_prompts_are_several_requests():
    p = parse_completion({"prompt": ["a", [5, 6]], "n": 2}, {})
    assert [r.WhichOneof("input") for r in p.requests] == ["prompt", "token_ids"]
    assert list(p.requests[1].token_ids.ids) == [5, 6] and p.n == 2


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "temperature": True}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({**CHAT, "tool_choice": "sometimes"}, "tool_choice"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({**CHAT, "priority": ["x"]}, "priority"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
])
def test_bad_fields_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat(body, {})
    assert info.value.status == 400 and info.value.param == param


class QueueUpstream:
    """An Upstream fed by the test: (prompt index, response | _END | ApiError)."""

    def __init__(self, num_open=1):
        self.queue = asyncio.Queue()
        self.num_open = num_open
        self.cancelled = False

    async def next(self, timeout_s):
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    def cancel(self):
        self.cancelled = True


def _resp(index, text, finish=0, completion_tokens=0, prompt_tokens=5, incomplete=""):
    r = inference_pb2.GenerateResponse(index=index, text=text, finish_reason=finish,
                                       incomplete=bool(incomplete), incomplete_reason=incomplete)
    r.usage.prompt_tokens, r.usage.completion_tokens = prompt_tokens, completion_tokens
    return r


def _run(upstream, feed, n=1, include_usage=False):
    fmt = Formatter("completion", "m", "id1", None, str)
    outcomes = []
    stream = SseStream(upstream, fmt, n, include_usage, on_end=outcomes.append)

    async def go():
        out = []
        feeder = asyncio.ensure_future(feed(upstream.queue))
        async for chunk in stream.__aiter__():
            out.append(chunk)
        await feeder
        return out
    return asyncio.run(go()), outcomes


def test_events_in_order_and_usage_over_every_sequence_and_prompt():
    async def feed(q):
        await asyncio.sleep(0.2)  # nothing for a while (SseResponse sends the heartbeats)
        q.put_nowait((0, _resp(0, "a")))
        q.put_nowait((0, _resp(1, "b", common_pb2.FINISH_REASON_LENGTH, 3)))
        q.put_nowait((1, _resp(0, "c", common_pb2.FINISH_REASON_STOP, 2, prompt_tokens=7)))
        q.put_nowait((0, _resp(0, "", common_pb2.FINISH_REASON_STOP, 4)))
        q.put_nowait((0, _END))
        q.put_nowait((1, _END))
    up = QueueUpstream(num_open=2)
    out, outcomes = _run(up, feed, n=2, include_usage=True)
    assert HEARTBEAT not in out
    events = [json.loads(c[6:]) for c in out if c not in (HEARTBEAT, DONE)]
    assert [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"])
            for e in events[:-1]] == [(0, "a", None), (1, "b", "length"), (2, "c", "stop"),
                                      (0, "", "stop")]
    assert events[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 9,
                                   "total_tokens": 21, "prompt_tokens_details": {"cached_tokens": 0}}
    assert out[-1] == DONE and outcomes == ["ok"] and up.cancelled


def test_a_broken_stream_ends_with_an_incomplete_error_event():
    async def feed(q):
        q.put_nowait((0, _resp(0, "partial", incomplete="deadline exceeded")))
        q.put_nowait((0, ApiError(504, "deadline exceeded", "timeout")))
    out, outcomes = _run(QueueUpstream(), feed)
    last = json.loads(out[-2][6:])
    assert json.loads(out[0][6:])["choices"][0]["text"] == "partial"
    assert last["error"]["incomplete"] is True
    assert last["error"]["incomplete_reason"] == "deadline exceeded"
    assert out[-1] == DONE and outcomes == ["timeout"]


def test_json_fragments_replace_text_deltas():
    async def feed(q):
        for text in ['{"a": 1', ', "b": ["x', '", "y"]', "}"]:
            q.put_nowait((0, _resp(0, text)))
        q.put_nowait((0, _resp(0, "", common_pb2.FINISH_REASON_STOP, 9)))
        q.put_nowait((0, _END))
    fmt = Formatter("chat", "m", "id1", None, str)
    up = QueueUpstream()
    stream = SseStream(up, fmt, 1, False, json_fragments=True)

    async def go():
        feeder = asyncio.ensure_future(feed(up.queue))
        out = [chunk async for chunk in stream.__aiter__()]
        await feeder
        return out
    out = asyncio.run(go())
    events = [json.loads(c[6:]) for c in out[:-1]]
    assert [(e["path"], e["value"]) for e in events[:-1]] == [
        ("$.a", 1), ("$.b[0]", "x"), ("$.b[1]", "y")]
    assert all(e["object"] == "json.fragment" and e["index"] == 0 for e in events[:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and out[-1] == DONE


def test_json_fragments_need_a_json_response_format_and_a_stream():
    with pytest.raises(ApiError) as info:
        parse_chat({**CHAT, "stream": True, "stream_options": {"json_fragments": True}}, {})
    assert info.value.param == "stream_options"
    p = parse_chat({**CHAT, "stream": True, "stream_options": {"json_fragments": True},
                    "response_format": {"type": "json_object"}}, {})
    assert p.json_fragments and p.requests[0].sampling.structured.json_object


def test_sse_response_sends_heartbeats_when_idle_and_stops_on_disconnect():
    """The ASGI response: chunks go out as yielded, a comment heartbeat whenever
    nothing was sent for heartbeat_s, and a disconnect cancels the iterator."""
    from llmesh.services.router.http_api.streams import SseResponse
    sent, closed = [], []

    async def body():
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(0.35)  # idle: heartbeats
            yield b"data: 2\n\n"
            await asyncio.sleep(10)  # the client leaves meanwhile
            yield b"data: never\n\n"
        finally:
            closed.append(True)

    async def go():
        async def send(msg):
            sent.append(msg)

        async def receive():
            await asyncio.sleep(0.6)
            return {"type": "http.disconnect"}
        await SseResponse(body(), 0.1, {"cache-control": "no-cache"})({}, receive, send)
    asyncio.run(go())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    chunks = [m["body"] for m in sent[1:]]
    assert chunks[0] == b"data: 1\n\n" and b"data: 2\n\n" in chunks
    assert 2 <= chunks[:chunks.index(b"data: 2\n\n")].count(HEARTBEAT) <= 4
    assert b"data: never\n\n" not in chunks and closed == [True]


def test_router_errors_map_to_http_statuses():
    """What the router's core raises becomes OpenAI's status and error type (each
    error names a gRPC status, which the gRPC API aborts with); a 429 carries its
    retry hint; a bad field is the `param`."""
    from llmesh.services.common import errors
    from llmesh.services.router.http_api.errors import from_error
    cases = [(errors.UnavailableError("no replica is ready"), 503, "service_unavailable"),
             (errors.DeadlineExceededError("deadline exceeded"), 504, "timeout"),
             (errors.UnauthenticatedError("no API key"), 401, "authentication_error"),
             (errors.PermissionDeniedError("model: not yours"), 403, "permission_error"),
             (errors.NotFoundError("model: 'x' is not served"), 404, "not_found_error"),
             (errors.DuplicateRequestError("r1"), 409, "conflict_error"),
             (errors.UpstreamError("INTERNAL", "no output"), 500, "server_error")]
    for e, status, type_ in cases:
        got = from_error(e)
        assert (got.status, got.type, got.code, got.message) == \
            (status, type_, e.code.lower(), str(e))
    e = from_error(errors.LimitExceededError("quota", "over quota", retry_after_s=2.5))
    assert e.status == 429 and e.headers() == {"retry-after": "2", "retry-after-ms": "2500"}
    e = from_error(errors.InvalidRequestError("temperature", "too hot"))
    assert e.status == 400 and e.param == "temperature" and e.message == "temperature: too hot"
    e = from_error(errors.UpstreamError("INVALID_ARGUMENT", "tokenizer: bad input"))
    assert e.status == 400 and e.param == "tokenizer"


def test_vllm_guided_fields_map_to_structured_output():
    from llmesh.services.common.grammar_spec import GrammarSpec
    s = parse_chat({**CHAT, "guided_choice": ["yes please", "no. (never)"]}, {}).requests[0] \
        .sampling.structured
    GrammarSpec("regex", s.regex).validate()  # a regex xgrammar accepts
    assert s.regex == r"yes please|no\. \(never\)"
    s = parse_completion({"prompt": "x", "guided_json": {"type": "object"}}, {}).requests[0] \
        .sampling.structured
    assert json.loads(s.json_schema) == {"type": "object"}
    assert parse_chat({**CHAT, "guided_grammar": 'root ::= "a"'}, {}).requests[0] \
        .sampling.structured.ebnf == 'root ::= "a"'
    for body, param in [({**CHAT, "guided_choice": []}, "guided_choice"),
                        ({**CHAT, "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
                        ({**CHAT, "guided_regex": "a", "response_format": {"type": "json_object"}},
                         "guided_regex")]:
        with pytest.raises(ApiError) as info:
            parse_chat(body, {})
        assert info.value.param == param


@pytest.mark.parametrize("name", ["max_tokens", "temperature", "top_p", "min_p",
                                  "repetition_penalty", "presence_penalty",
                                  "frequency_penalty", "n", "repetition_min_repeats"])
def test_http_and_grpc_accept_the_same_ranges(name):
    """One declaration (sampling_params.RANGES): a value at each end of the range is
    accepted over HTTP and by the domain check behind gRPC; one past it is refused
    by both, naming the field."""
    from llmesh.services.common.errors import InvalidRequestError
    from llmesh.services.common.sampling_params import RANGES, SamplingParams
    bounds = RANGES[name]
    step = 1 if bounds.is_int else 1e-3
    inside = [bounds.lo + (step if bounds.lo_open else 0), bounds.hi]
    outside = [bounds.lo - (0 if bounds.lo_open else step), bounds.hi + step]
    for value in inside:
        sampling = parse_completion({"prompt": "x", name: value}, {}).requests[0].sampling
        assert getattr(sampling, name) == pytest.approx(value)
        SamplingParams(**{name: value}).validate(vocab_size=100)
    for value in outside:
        with pytest.raises(ApiError) as http:
            parse_completion({"prompt": "x", name: value}, {})
        assert http.value.param == name
        with pytest.raises(InvalidRequestError) as grpc_side:
            SamplingParams(**{name: value}).validate(vocab_size=100)
        assert grpc_side.value.field == name


def test_every_declared_parameter_crosses_every_edge_unchanged():
    """The one declaration (SamplingParams' fields) drives each edge: a body that
    sets every parameter off its default reaches the domain value the same over
    HTTP as built directly, and survives the mesh's wire form, the public form (a
    dead letter's replay) and asdict/from_dict unchanged."""
    import dataclasses

    from llmesh.services.common import convert
    from llmesh.services.common.grammar_spec import GrammarSpec
    from llmesh.services.common.sampling_params import PARAMS, SamplingParams
    want = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05,
                          repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                          seed=123, stop_token_ids=(7, 9), stop=("END",), ignore_eos=False,
                          logprobs=3, n=2, repetition_max_ngram=4, repetition_min_repeats=3,
                          grammar=GrammarSpec("regex", "[a-z]+"), speculative_tokens=5)
    defaults = SamplingParams()
    off_default = {n for n in PARAMS if getattr(want, n) != getattr(defaults, n)}
    assert off_default == set(PARAMS) - {"ignore_eos"}  # (tested apart: it conflicts with grammar)
    body = {"prompt": "x", **{n: getattr(want, n) for n in PARAMS
                              if n not in ("grammar", "stop", "stop_token_ids")},
            "stop": list(want.stop), "stop_token_ids": list(want.stop_token_ids),
            "guided_regex": "[a-z]+"}
    public = parse_completion(body, {}).requests[0].sampling
    assert convert.sampling_from_public(public) == want
    assert convert.sampling_from_wire(convert.sampling_to_wire(want)) == want
    assert convert.sampling_from_public(convert.sampling_to_public(want)) == want
    assert SamplingParams.from_dict(dataclasses.asdict(want)) == want
    plain = parse_completion({"prompt": "x", "ignore_eos": True}, {}).requests[0].sampling
    assert convert.sampling_from_public(plain).ignore_eos is True


def test_the_sampler_reads_every_parameter_declared_as_its_own():
    """A parameter declared `sampler=True` that the sampler never reads would be
    carried everywhere and silently ignored."""
    import inspect
    import re

    from llmesh.services.common.sampling_params import SAMPLER_PARAMS
    from llmesh.services.executor import sampler
    read = set(re.findall(r"\bp(?:arams)?\.([a-z_]+)", inspect.getsource(sampler)))
    assert set(SAMPLER_PARAMS) - {"temperature"} <= read and "is_greedy" in read
