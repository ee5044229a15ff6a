"""The mesh as processes on loopback: Envoy + tokenizer, router, scheduler, kvcache, executor."""
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmesh.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2,
                       scheduler_pb2_grpc)
from mesh_fixture import Mesh, serving, wait_until
from llmesh.mesh.supervisor import is_serving
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("mesh"))
    yield from serving(m)


def _scheduler(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    return scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def _stats(mesh):
    return _scheduler(mesh).GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)


def _kv_used(mesh):
    return _stats(mesh).num_used_blocks


def _greedy(max_tokens, **kw):
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_streams_match_in_process_engine_for_32_concurrent_requests(mesh, stub, tiny_model):
    rng = random.Random(5)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(2, 150)) for _ in range(32)]
    lengths = [rng.randint(4, 40) for _ in prompts]

    def call(i):
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompts[i]),
                                            sampling=_greedy(lengths[i]))
        chunks = list(stub.Generate(req, timeout=120))
        return [t for c in chunks for t in c.token_ids], chunks

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    engine = Engine(tiny_model, EngineConfig())
    expect = engine.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    for (tokens, chunks), exp, n in zip(results, expect, lengths):
        assert tokens == exp[0].token_ids
        last = chunks[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and not last.incomplete
        assert last.usage.completion_tokens == n
        assert last.timings.e2e_s >= last.timings.ttft_s > 0
    assert wait_until(lambda: _kv_used(mesh) == 0, 5)


def test_text_prompt_and_complete(mesh, stub, tiny_model_dir):
    from llmesh.services.common.tokenizer import TextTokenizer
    tok = TextTokenizer(tiny_model_dir)
    req = inference_pb2.GenerateRequest(prompt="The lighthouse keeper", sampling=_greedy(10))
    streamed = list(stub.Generate(req, timeout=60))
    whole = stub.Complete(req, timeout=60)
    ids = [t for c in streamed for t in c.token_ids]
    assert list(whole.token_ids) == ids
    assert whole.text == "".join(c.text for c in streamed) == tok.decode(ids)
    assert list(stub.Tokenize(inference_pb2.TokenizeRequest(text="hello"), timeout=10).token_ids) \
        == tok.encode("hello")
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
    assert [m.name for m in models] == ["default"] and models[0].vocab_size == tok.vocab_size


def test_stop_string_ends_stream_without_it(mesh, stub):
    req = inference_pb2.GenerateRequest(prompt="The lighthouse keeper", sampling=_greedy(20))
    full = stub.Complete(req, timeout=60).text
    stop = full[8:12]
    req.sampling.stop.append(stop)
    out = stub.Complete(req, timeout=60)
    assert out.text == full[:full.index(stop)]
    assert out.finish_reason == common_pb2.FINISH_REASON_STOP


def test_long_stream_is_not_cut_by_envoy(mesh, stub):
    """A stream open for over 30 s (the client reads slowly) survives Envoy's defaults."""
    req = inference_pb2.GenerateRequest(prompt="Once", sampling=_greedy(330))
    start = time.monotonic()
    tokens = 0
    last = None
    for chunk in stub.Generate(req, timeout=120):
        tokens += len(chunk.token_ids)
        last = chunk
        time.sleep(0.1)
    assert time.monotonic() - start > 30
    assert tokens == 330 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_cancel_mid_stream_frees_kv_blocks(mesh, stub):
    assert wait_until(lambda: _kv_used(mesh) == 0, 5)
    req = inference_pb2.GenerateRequest(prompt="A long answer", sampling=_greedy(1500))
    call = stub.Generate(req, timeout=120)
    it = iter(call)
    for _ in range(5):
        next(it)
    assert _stats(mesh).num_used_blocks > 0
    call.cancel()
    t0 = time.monotonic()
    assert wait_until(lambda: _kv_used(mesh) == 0, 1.0)
    assert time.monotonic() - t0 <= 1.0
    assert _stats(mesh).num_running == 0


def test_deadline_reaches_the_scheduler(mesh, stub):
    req = inference_pb2.GenerateRequest(prompt="Slow", sampling=_greedy(1800))
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Generate(req, timeout=0.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the scheduler ended it too: nothing keeps running or holding blocks
    assert wait_until(lambda: _stats(mesh).num_running == 0 and _kv_used(mesh) == 0, 2.0)


def _settled_stats(mesh):
    """The scheduler's stats once idle and no step is still landing (a request that
    just ended may leave a planned step in flight): the same step count in three
    readings 0.25 s apart."""
    seen: list = []
    for _ in range(40):
        now = _stats(mesh)
        seen = [s for s in seen if s.num_steps == now.num_steps] + [now]
        if now.num_running == 0 and len(seen) >= 3:
            return now
        time.sleep(0.25)
    raise AssertionError("the scheduler kept stepping while idle")


@pytest.mark.parametrize("make,field", [
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
        max_tokens=4, n=0)), "n"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
        max_tokens=4, temperature=-1.0)), "temperature"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
        max_tokens=4, top_p=0.0)), "top_p"),
    (lambda: inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1, 999999]),
                                           sampling=_greedy(4)), "prompt_token_ids"),
    (lambda: inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[]),
                                           sampling=_greedy(4)), "prompt_token_ids"),
    (lambda: inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1] * 2100),
                                           sampling=_greedy(4)), "prompt_token_ids"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(5000)), "max_tokens"),
    (lambda: inference_pb2.GenerateRequest(sampling=_greedy(4)), "input"),
    (lambda: inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[1, 2**63]),
                                           sampling=_greedy(4)), "prompt_token_ids"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
        max_tokens=4, stop=["ab"] * 17)), "stop"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(4),
                                           resume_token_ids=[5] * 4), "resume_token_ids"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(4, n=2),
                                           resume_token_ids=[5]), "resume_token_ids"),
    (lambda: inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(4),
                                           resume_token_ids=[99999]), "resume_token_ids"),
], ids=["n0", "temperature", "top_p", "oov", "empty", "too_long", "past_ctx", "no_input",
        "id_2^63", "stops", "resume_all", "resume_n2", "resume_oov"])
def test_bad_requests_are_invalid_argument_and_reach_no_executor(mesh, stub, make, field):
    before = _settled_stats(mesh)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(make(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    after = _stats(mesh)
    if after.num_probes == before.num_probes:  # (a known-answer probe takes steps of its own)
        assert after.num_steps == before.num_steps


@pytest.mark.parametrize("body", [
    b"\x12\x02\xff\xfe",  # prompt (field 2, a string) holding invalid UTF-8
    b"\x0a\x03\xc3\x28x",  # model (field 1): a broken two-byte sequence
    b"\x12\x10ab",  # a length past the end of the body
], ids=["prompt_utf8", "model_utf8", "truncated"])
def test_undecodable_requests_are_invalid_argument(mesh, body):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        for method, call in (("Generate", ch.unary_stream), ("Complete", ch.unary_unary)):
            rpc = call(f"/llmesh.v1.Inference/{method}", request_serializer=lambda b: b,
                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                out = rpc(body, timeout=10)
                list(out) if method == "Generate" else out
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "does not decode" in info.value.details()


def test_a_broken_stream_resumes_with_its_seed_and_tokens(mesh, stub):
    """An unseeded sampled stream reports the seed the router drew; sent again with
    it and the first tokens as resume_token_ids, the mesh streams exactly the rest."""
    req = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[0] + list(range(40, 90))),
        sampling=common_pb2.SamplingParams(max_tokens=24, temperature=0.9, ignore_eos=True))
    chunks = list(stub.Generate(req, timeout=60))
    seed = chunks[0].seed
    assert seed and not any(c.seed for c in chunks[1:])
    whole = [t for c in chunks for t in c.token_ids]
    assert len(whole) == 24
    req.sampling.seed = seed
    again = [t for c in stub.Generate(req, timeout=60) for t in c.token_ids]
    assert again == whole
    req.resume_token_ids[:] = whole[:10]
    rest = list(stub.Generate(req, timeout=60))
    assert [t for c in rest for t in c.token_ids] == whole[10:]
    assert rest[-1].usage.completion_tokens == 24 and not rest[-1].incomplete


def test_oversized_message_is_resource_exhausted(mesh, stub):
    req = inference_pb2.GenerateRequest(prompt="x" * (5 * 2**20), sampling=_greedy(4))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reflection_lists_and_calls_the_public_api(mesh):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(mesh.endpoint) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "llmesh.v1.Inference" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("llmesh.v1.Inference")
        method = service.FindMethodByName("ListModels")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary("/llmesh.v1.Inference/ListModels",
                              request_serializer=req_cls.SerializeToString,
                              response_deserializer=resp_cls.FromString)
        resp = call(req_cls(), timeout=10)
        assert resp.models[0].name == "default"


def test_kill_executor_while_idle_is_restarted(mesh, stub):
    pid = mesh.state["pids"]["executor-0-0"]
    port = mesh.config["replica_ports"][0]["executors"][0]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not is_serving(port), 10)
    assert wait_until(lambda: is_serving(port), 60), mesh.logs()
    sched_port = mesh.config["replica_ports"][0]["scheduler"]
    assert wait_until(lambda: is_serving(sched_port), 30), mesh.logs()
    req = inference_pb2.GenerateRequest(prompt="Back again", sampling=_greedy(8))
    ok = 0
    for _ in range(3):
        out = stub.Complete(req, timeout=60)
        ok += len(out.token_ids) == 8
    assert ok == 3


def test_status_and_config_show(mesh):
    import json
    proc = mesh.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["endpoint"] == mesh.endpoint
    assert all(status["services"].values())
    assert status["replicas"][0]["kv_used_blocks"] == 0
    proc = mesh.cli("config", "show")
    shown = __import__("yaml").safe_load(proc.stdout)
    assert shown["engine"]["num_kv_blocks"] == 512 and shown["engine"]["block_size"] == 16


def test_oversized_headers_fail_their_own_request_not_the_connection(mesh):
    """2,000 headers, or a 60 KB one, are RESOURCE_EXHAUSTED for that request; a stream
    sharing the client's connection goes on (Envoy used to GOAWAY the connection)."""
    import threading
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        box = []

        def stream():
            req = inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(300))
            box.append(sum(len(c.token_ids) for c in stub.Generate(req, timeout=60)))
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)
        small = inference_pb2.GenerateRequest(prompt="x", sampling=_greedy(2))
        for metadata in ([(f"x-h{i}", "v") for i in range(2000)], [("x-big", "a" * 60_000)]):
            with pytest.raises(grpc.RpcError) as info:
                stub.Complete(small, timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        t.join(60)
        assert box == [300]
        assert len(stub.Complete(small, timeout=10).token_ids) == 2  # the connection still works


def test_the_ttft_budget_counts_from_the_gateway(mesh, stub):
    """Envoy stamps when a request reached it, replacing a client's own stamp; the
    budget counts from that stamp, so a request that arrives at the router with
    its interactive budget (2 s) already spent is refused at once."""
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
                                        sampling=_greedy(2), priority=common_pb2.PRIORITY_INTERACTIVE)
    stale = (("x-llmesh-gateway-start", f"{time.time() - 30:.6f}"),)
    assert len(list(stub.Generate(req, metadata=stale, timeout=30))) >= 1  # Envoy restamps
    port = mesh.config["router_ports"][0]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        direct = inference_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(direct.Generate(req, metadata=stale, timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "before this replica" in e.value.details()
        assert len(list(direct.Generate(req, timeout=30))) >= 1  # (no stamp: counts from now)
