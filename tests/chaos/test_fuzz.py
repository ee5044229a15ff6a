"""A concurrent fuzz run through Envoy: 2,000 seeded requests (hypothesis) with
odd field values, odd metadata and undecodable bodies, 16 at a time. None may
end UNKNOWN or INTERNAL (those are bugs), no process may crash or restart, and
the mesh serves a normal request afterwards."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chaos.load import replica_serving
from integration.mesh_fixture import Mesh, serving
from llmesh.v1 import common_pb2, inference_pb2

BATCHES, PER_BATCH = 40, 50  # 2,000 requests
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), observability={"tracing": "off"})
    yield from serving(m)


text = st.text(max_size=12)
u64 = st.one_of(st.integers(0, 3100), st.integers(0, 2**64 - 1))
f32 = st.one_of(st.floats(-3, 3), st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 0.0]))
small = st.one_of(st.integers(0, 40), st.sampled_from([2047, 10**6, 2**31 - 1]))
structured = st.one_of(
    st.builds(common_pb2.StructuredOutput, regex=text),
    st.builds(common_pb2.StructuredOutput, json_schema=st.one_of(text, st.just(
        '{"type": "object", "properties": {"a": {"type": "integer"}}}'))),
    st.builds(common_pb2.StructuredOutput, ebnf=text))
weird_sampling = st.builds(
    common_pb2.SamplingParams, max_tokens=small, temperature=f32, top_p=f32,
    top_k=st.integers(-5, 2**31 - 1), n=st.one_of(st.integers(0, 4), st.just(10**4)),
    seed=st.one_of(st.none(), u64), presence_penalty=f32, frequency_penalty=f32,
    stop=st.lists(text, max_size=3), ignore_eos=st.booleans(),
    logprobs=st.integers(0, 30), structured=st.one_of(st.none(), structured))
sane_sampling = st.builds(
    common_pb2.SamplingParams, max_tokens=st.integers(1, 24),
    temperature=st.floats(0, 1.5), top_p=st.floats(0.05, 1), top_k=st.integers(0, 50),
    n=st.integers(1, 3), seed=st.one_of(st.none(), st.integers(0, 2**63)),
    stop=st.lists(st.text(max_size=3), max_size=2), ignore_eos=st.booleans(),
    logprobs=st.integers(0, 5))
chat = st.builds(inference_pb2.ChatMessages, messages=st.lists(st.builds(
    inference_pb2.ChatMessage, role=st.one_of(st.sampled_from(["user", "system"]), text),
    content=text), max_size=3))
# mostly sane requests (so the fuzz reaches the scheduler and the executor), some odd
request = st.builds(
    inference_pb2.GenerateRequest,
    model=st.one_of(st.just(""), st.just(""), st.just("default"), text),
    sampling=st.one_of(sane_sampling, sane_sampling, sane_sampling, weird_sampling),
    request_id=st.one_of(st.just(""), st.just(""), text),
    priority=st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 7)),
    timeout_ms=st.one_of(st.just(0), st.just(0), st.integers(0, 5000)),
    resume_token_ids=st.one_of(st.just([]), st.just([]), st.lists(st.integers(0, 3100),
                                                                max_size=3)))
inputs = st.one_of(st.builds(dict, token_ids=st.builds(inference_pb2.TokenIds, ids=st.lists(
                       st.integers(0, 3000), min_size=1, max_size=40))),
                   st.builds(dict, prompt=st.text(max_size=60)), st.builds(dict, chat=chat),
                   st.builds(dict, token_ids=st.builds(inference_pb2.TokenIds,
                                                       ids=st.lists(u64, max_size=40))),
                   st.just({}))
metadata = st.one_of(st.just(()), st.just(()), st.lists(st.tuples(
    st.sampled_from(["authorization", "x-priority", "x-tenant", "grpc-timeout-ish"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)),
    max_size=3).map(tuple))
case = st.one_of(*[st.tuples(st.just("msg"), request, inputs, metadata)] * 4,
                 st.tuples(st.just("raw"), st.binary(max_size=48), st.just({}), metadata))


def _send(endpoint: str, item) -> str:
    kind, body, inp, md = item
    with grpc.insecure_channel(endpoint) as ch:
        rpc = ch.unary_stream("/llmesh.v1.Inference/Generate",
                              request_serializer=lambda b: b,
                              response_deserializer=inference_pb2.GenerateResponse.FromString)
        if kind == "msg":
            req = inference_pb2.GenerateRequest()
            req.CopyFrom(body)
            for field, value in inp.items():
                getattr(req, field).CopyFrom(value) if field != "prompt" else \
                    setattr(req, "prompt", value)
            body = req.SerializeToString()
        try:
            for _ in rpc(body, timeout=60, metadata=md):
                pass
            return "OK"
        except grpc.RpcError as e:
            if e.code() in BUGS:
                return f"{e.code().name}: {e.details()}"
            return e.code().name


def test_two_thousand_fuzzed_requests_find_no_bug_and_crash_nothing(mesh):
    pids = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    seen: dict[str, int] = {}

    @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(case, min_size=PER_BATCH, max_size=PER_BATCH))
    def run(batch):
        with ThreadPoolExecutor(16) as pool:
            for status in pool.map(lambda item: _send(mesh.endpoint, item), batch):
                seen[status] = seen.get(status, 0) + 1

    run()
    print("fuzz statuses:", seen)
    bugs = {s: n for s, n in seen.items() if s.split(":")[0] in {b.name for b in BUGS}}
    assert not bugs, bugs
    assert sum(seen.values()) >= BATCHES * PER_BATCH * 0.9, seen  # (hypothesis may shrink)
    assert seen.get("OK", 0) and seen.get("INVALID_ARGUMENT", 0), seen
    after = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    assert after == pids, "a process crashed and was restarted"
    assert replica_serving(mesh)
