"""Tracing, metrics and logs of the real mesh.

One mesh exports OTLP to a collector built here on opentelemetry-proto; another
uses the default local file that `llmesh trace` reads.
"""
import json
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from llmesh.mesh.ports import free_port
from mesh_fixture import Mesh, wait_until

SECRET_PROMPT = "zebra quartz lighthouse"
# every service a request passes through (the kvcache index is fed beside the steps)
ALL_SERVICES = {"envoy", "router", "tokenizer", "scheduler", "executor"}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self):
        self.spans: list[dict] = []
        self.raw: list[bytes] = []

    def Export(self, request, context):
        self.raw.append(request.SerializeToString())
        for rs in request.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes
                           if a.key == "service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append({
                        "service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                        "attrs": {a.key: a.value for a in s.attributes}})
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    port = free_port()
    c = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    c.endpoint = f"127.0.0.1:{port}"
    yield c
    server.stop(1)


@pytest.fixture(scope="module")
def meshes(tiny_model_dir, tmp_path_factory, collector):
    """Both meshes (the module's tests take turns on them), brought up side by side
    and down again side by side: (the OTLP one, the local-file one)."""
    # (two replicas in the OTLP one: the router asks the kvcache index where a
    # prompt's prefix is, a traced hop)
    both = (Mesh(tiny_model_dir, tmp_path_factory.mktemp("otlp-mesh"), replicas=2,
                 observability={"tracing": "otlp", "otlp_endpoint": collector.endpoint}),
            Mesh(tiny_model_dir, tmp_path_factory.mktemp("file-mesh")))
    try:
        with futures.ThreadPoolExecutor(2) as pool:
            for up in [pool.submit(m.up) for m in both]:
                up.result()
        yield both
    finally:
        with futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda m: m.down(in_process=True), both))


@pytest.fixture(scope="module")
def otlp_mesh(meshes):
    return meshes[0]


@pytest.fixture(scope="module")
def file_mesh(meshes):
    return meshes[1]


def _complete(endpoint, prompt, max_tokens, metadata=None):
    with grpc.insecure_channel(endpoint) as ch:
        return inference_pb2_grpc.InferenceStub(ch).Complete(
            inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True)),
            timeout=60, metadata=metadata)


def _trace_of(collector, request_id):
    ids = {s["trace_id"] for s in collector.spans
           if s["attrs"].get("llmesh.request_id") and
           s["attrs"]["llmesh.request_id"].string_value == request_id}
    return ids


def test_one_trace_from_the_gateway_to_the_executor_step(otlp_mesh, collector):
    out = _complete(otlp_mesh.endpoint, SECRET_PROMPT, 5)
    rid = out.request_id

    def chain_from_step():
        """The parent chain from an executor step upwards, as far as it has arrived."""
        ids = _trace_of(collector, rid)
        if len(ids) != 1:
            return None, []
        (trace_id,) = ids
        spans = [s for s in collector.spans if s["trace_id"] == trace_id]
        by_id = {s["span_id"]: s for s in spans}
        step = next((s for s in spans if s["name"] == "executor.step"), None)
        chain = [step] if step else []
        while chain and chain[-1]["parent"] in by_id:
            chain.append(by_id[chain[-1]["parent"]])
        return trace_id, chain

    def complete_trace():
        # services export in batches on their own schedules: wait until every service's
        # spans and the whole chain up to the root have arrived
        trace_id, chain = chain_from_step()
        if not chain or chain[-1]["parent"]:
            return False
        spans = [s for s in collector.spans if s["trace_id"] == trace_id]
        return ALL_SERVICES | {"kvcache"} <= {s["service"] for s in spans}
    assert wait_until(complete_trace, 30), \
        [(s["service"], s["name"]) for s in chain_from_step()[1]]
    trace_id, chain = chain_from_step()
    spans = [s for s in collector.spans if s["trace_id"] == trace_id]
    names = [(s["service"], s["name"]) for s in chain]
    assert chain[-1]["service"] == "envoy", names
    assert ("scheduler", "engine.step") in names and ("scheduler", "scheduler.request") in names
    assert ("router", "/llmesh.v1.Inference/Complete") in names
    # the request span's GenAI attributes
    req = next(s for s in spans if s["name"] == "scheduler.request")
    a = req["attrs"]
    assert a["gen_ai.request.max_tokens"].int_value == 5
    assert a["gen_ai.usage.output_tokens"].int_value == 5
    assert a["gen_ai.usage.input_tokens"].int_value == out.usage.prompt_tokens
    assert a["gen_ai.request.model"].string_value == "default"
    assert [v.string_value for v in a["gen_ai.response.finish_reasons"].array_value.values] \
        == ["length"]
    assert {"queue", "prefill", "prefill.chunk", "decode"} <= {s["name"] for s in spans}
    assert any(s["service"] == "tokenizer" and "Encode" in s["name"] for s in spans)
    # the kvcache hop: the router's client span and the index's server span under it
    match = [s for s in spans if s["name"] == "/llmesh.v1.KVCache/Match"]
    assert {s["service"] for s in match} == {"router", "kvcache"}, names
    server = next(s for s in match if s["service"] == "kvcache")
    assert {s["span_id"]: s for s in spans}[server["parent"]]["service"] == "router"
    # no prompt or output text anywhere in what was exported
    blob = b"".join(collector.raw)
    for word in SECRET_PROMPT.split() + [out.text.strip()[:12]]:
        if word:
            assert word.encode() not in blob


def test_a_client_span_is_the_root(otlp_mesh, collector):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    out = _complete(otlp_mesh.endpoint, "Hello", 3,
                    metadata=[("traceparent", f"00-{trace_id}-{parent}-01")])
    assert wait_until(lambda: _trace_of(collector, out.request_id) == {trace_id}, 20)
    assert wait_until(lambda: any(s["service"] == "envoy" and s["trace_id"] == trace_id
                                  for s in collector.spans), 10)
    gateway = next(s for s in collector.spans
                   if s["service"] == "envoy" and s["trace_id"] == trace_id)
    assert gateway["parent"] == parent


def _metrics(port) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_agree_with_what_clients_received(file_mesh):
    ports = file_mesh.config["observability"]["metrics_ports"]
    router = ports["router-0"]
    before = _metrics(router)
    lengths = [3, 7, 1, 12, 5, 9]
    with futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda n: _complete(file_mesh.endpoint, f"Count {n}", n), lengths))
    after = _metrics(router)

    def delta(name, labels='model="default"'):  # (the mesh's model name: default)
        key = f"{name}{{{labels}}}"
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert delta("llmesh_generation_tokens_total") == sum(o.usage.completion_tokens for o in outs)
    assert delta("llmesh_prompt_tokens_total") == sum(o.usage.prompt_tokens for o in outs)
    assert delta("llmesh_time_to_first_token_seconds_count") == len(lengths)
    assert delta("llmesh_e2e_request_latency_seconds_count") == len(lengths)
    assert delta("llmesh_requests_total",
                 'finish_reason="length",model="default",status="OK"') == len(lengths)
    assert delta("llmesh_inter_token_latency_seconds_count") <= sum(lengths) - len(lengths)
    sched = ports["scheduler-0"]
    assert wait_until(lambda: _metrics(sched)["llmesh_kv_cache_usage_ratio"] == 0.0, 5)
    s = _metrics(sched)
    assert s["llmesh_num_requests_running"] == 0 and s["llmesh_engine_steps_total"] > 0
    for name, port in ports.items():  # every service answers, with its process memory
        assert _metrics(port)["process_resident_memory_bytes"] > 0, name


def test_a_bad_request_is_counted_with_its_status(file_mesh):
    router = file_mesh.config["observability"]["metrics_ports"]["router-0"]
    key = 'llmesh_requests_total{finish_reason="none",model="default",status="INVALID_ARGUMENT"}'
    before = _metrics(router).get(key, 0.0)
    with pytest.raises(grpc.RpcError):
        _complete(file_mesh.endpoint, "x", 10**6)  # past the context
    # counted as the handler unwinds, just after the client has its status
    assert wait_until(lambda: _metrics(router).get(key) == before + 1, 5)


def test_llmesh_trace_renders_the_last_request_from_the_local_file(file_mesh):
    out = _complete(file_mesh.endpoint, SECRET_PROMPT, 4)
    traces = file_mesh.run_dir / "traces.jsonl"

    def has_all():
        if not traces.exists():
            return False
        spans = [json.loads(line) for line in traces.read_text().splitlines() if line]
        ids = {s["trace_id"] for s in spans
               if s["attributes"].get("llmesh.request_id") == out.request_id}
        return ids and ALL_SERVICES <= {s["service"] for s in spans if s["trace_id"] in ids}
    assert wait_until(has_all, 20)
    proc = file_mesh.cli("trace", "--last")
    assert proc.returncode == 0, proc.stderr
    for needle in ("envoy", "ingress", "scheduler.request", "engine.step", "executor.step",
                   "decode", out.request_id):
        assert needle in proc.stdout
    proc = file_mesh.cli("trace", out.request_id, "--json")
    spans = json.loads(proc.stdout)
    assert {"trace_id", "span_id", "parent_span_id", "service", "name", "start_ns",
            "end_ns"} <= set(spans[0])
    assert len({s["trace_id"] for s in spans}) == 1
    assert all(s["end_ns"] >= s["start_ns"] for s in spans)
    assert SECRET_PROMPT.split()[0] not in traces.read_text()
    missing = file_mesh.cli("trace", "no-such-request")
    assert missing.returncode == 1 and "no trace" in missing.stderr


def test_llmesh_trace_right_after_a_request_waits_for_its_late_spans(file_mesh):
    """Each process exports on its own timer: when the first of a request's spans
    reach the file, others are still on their way. `llmesh trace` waits them out."""
    out = _complete(file_mesh.endpoint, "a lantern by the river", 4)
    traces = file_mesh.run_dir / "traces.jsonl"
    assert wait_until(lambda: traces.exists() and out.request_id in traces.read_text(), 20)
    proc = file_mesh.cli("trace", out.request_id, "--json")
    assert proc.returncode == 0, proc.stderr
    spans = json.loads(proc.stdout)
    assert ALL_SERVICES <= {s["service"] for s in spans}, sorted({s["service"] for s in spans})


def test_logs_are_json_lines_with_the_service(file_mesh):
    lines = (file_mesh.run_dir / "logs" / "scheduler-0.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all(r["service"] == "scheduler" for r in records)
    assert not any(SECRET_PROMPT.split()[0] in line for line in lines)


def test_status_reads_the_metrics(file_mesh):
    _complete(file_mesh.endpoint, "Status", 3)
    proc = file_mesh.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["metrics"]
    router = _metrics(file_mesh.config["observability"]["metrics_ports"]["router-0"])
    assert m["generation_tokens"] == router['llmesh_generation_tokens_total{model="default"}'] > 0
    assert m["requests"] >= 1 and m["mean_ttft_s"] > 0
    assert set(m["rss_bytes"]) == set(file_mesh.config["observability"]["metrics_ports"])


def test_decode_only_steps_are_sampled_one_in_eight(otlp_mesh, collector):
    out = _complete(otlp_mesh.endpoint, "Count the steps", 33)
    assert wait_until(lambda: len(_trace_of(collector, out.request_id)) == 1, 20)
    (trace_id,) = _trace_of(collector, out.request_id)

    def steps(name):
        return [s for s in collector.spans if s["trace_id"] == trace_id and s["name"] == name]
    # the prefill step always, then one decode-only step in eight: 33 steps give 5 or 6
    assert wait_until(lambda: 5 <= len(steps("engine.step")) == len(steps("executor.step")), 20), \
        (len(steps("engine.step")), len(steps("executor.step")))
    assert len(steps("engine.step")) <= 6
    # the request's own spans are whole: its decode span covers every token (they end
    # with the request and may come in a later export than the steps')
    assert wait_until(lambda: len(steps("decode")) == 1 and len(steps("prefill")) == 1, 20), \
        (len(steps("decode")), len(steps("prefill")))


def test_an_http_request_is_one_trace_across_every_hop(file_mesh):
    """The HTTP API goes through the same tracing: Envoy's span, the router's HTTP
    span and its request spans, tokenizer, scheduler and executor, one trace."""
    import urllib.request
    body = json.dumps({"model": "default", "prompt": "a lighthouse", "max_tokens": 3}).encode()
    req = urllib.request.Request(f"http://{file_mesh.endpoint}/v1/completions", data=body,
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        request_id = json.loads(r.read())["id"].removeprefix("cmpl-")
    traces = file_mesh.run_dir / "traces.jsonl"

    def spans_of_request():
        if not traces.exists():
            return []
        spans = [json.loads(line) for line in traces.read_text().splitlines() if line]
        ids = {s["trace_id"] for s in spans
               if s["attributes"].get("llmesh.request_id") == request_id}
        return [s for s in spans if s["trace_id"] in ids]
    assert wait_until(lambda: ALL_SERVICES <= {s["service"] for s in spans_of_request()}, 20)
    spans = spans_of_request()
    assert len({s["trace_id"] for s in spans}) == 1
    http = [s for s in spans if s["name"] == "POST /v1/completions"]
    assert len(http) == 1 and http[0]["service"] == "router"
