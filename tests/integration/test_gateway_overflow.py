"""Envoy's circuit breakers to the routers (envoy.max_requests, max_pending_requests,
max_connections): what comes past them is refused as overload (gRPC
RESOURCE_EXHAUSTED, HTTP 429 with an OpenAI error body, each with a retry hint),
not answered 503 / UNAVAILABLE as a failed server; what they let in is served whole.
And a mesh started with a low soft limit on open files runs with the hard one."""
import asyncio
import json
import resource
import threading
from pathlib import Path
import urllib.error
import urllib.request

import grpc
import pytest

from integration.mesh_fixture import Mesh, envoy_counters, serving
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

LIMIT = 2  # requests in flight to the routers (HTTP/1.1: connections), one more pending
MAX_TOKENS = 24
BURST = 12


LOW_SOFT_LIMIT = 256  # open files: what the mesh is started with (the hard limit stays)


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("gateway-overflow"),
             observability={"tracing": "off"},
             envoy={"max_requests": LIMIT, "max_connections": LIMIT, "max_pending_requests": 1},
             engine={"num_kv_blocks": 512, "bench_step_ms": 10.0, "probe_interval_s": 0})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, LOW_SOFT_LIMIT), hard))
    try:  # (the mesh's processes inherit the limit they start under)
        meshes = serving(m)
        up = next(meshes)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    yield up
    next(meshes, None)


def _open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files limit for {pid}")


def test_the_mesh_runs_with_the_hard_limit_on_open_files(mesh):
    """A gateway flood holds a connection per HTTP request in flight to a router: a
    soft limit of 1,024 made Envoy's connections fail at 900 requests/s."""
    pids = {**mesh.state["pids"], "supervisor": mesh.state["supervisor_pid"]}
    assert {"envoy", "router-0", "scheduler-0"} <= set(pids)
    for name, pid in pids.items():
        soft, hard = _open_files_limits(pid)
        assert soft == hard or int(soft) > LOW_SOFT_LIMIT, (name, soft, hard)


def _overflows(mesh, cluster: str) -> int:
    return sum(envoy_counters(
        mesh, f"^cluster\\.{cluster}\\.upstream_rq_(pending|retry)_overflow$").values())


async def _grpc_burst(endpoint: str):
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(i: int):
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=[0, 5 + i, 7, 9]),
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            try:
                tokens = [t async for r in stub.Generate(req, timeout=60) for t in r.token_ids]
            except grpc.aio.AioRpcError as e:
                return e.code().name, dict(e.trailing_metadata() or ()).get("retry-after-ms")
            assert len(tokens) == MAX_TOKENS
            return "OK", None
        return await asyncio.gather(*(one(i) for i in range(BURST)))


def test_grpc_past_the_breaker_is_resource_exhausted_with_a_retry_hint(mesh):
    before = _overflows(mesh, "routers")
    results = asyncio.run(_grpc_burst(mesh.endpoint))
    refused = [r for r in results if r[0] != "OK"]
    assert refused, "the burst never passed the breaker"
    assert _overflows(mesh, "routers") - before >= len(refused)  # the breaker refused them
    assert all(r == ("RESOURCE_EXHAUSTED", "1000") for r in refused), refused
    assert any(r[0] == "OK" for r in results)


def test_http_past_the_breaker_is_429_with_retry_after(mesh):
    before = _overflows(mesh, "http")
    results, lock = [], threading.Lock()

    def one(i: int):
        req = urllib.request.Request(
            f"http://{mesh.endpoint}/v1/completions",
            data=json.dumps({"prompt": [0, 5 + i, 7, 9], "max_tokens": MAX_TOKENS,
                             "ignore_eos": True, "stream": True}).encode(),
            headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                body = resp.read().decode()
                out = (resp.status, None, None, body.rstrip().endswith("data: [DONE]"))
        except urllib.error.HTTPError as e:
            out = (e.code, e.headers.get("retry-after"), e.read().decode(), None)
        with lock:
            results.append(out)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == BURST
    refused = [r for r in results if r[0] != 200]
    assert refused, "the burst never passed the breaker"
    assert _overflows(mesh, "http") - before >= len(refused)
    for status, retry_after, body, _ in refused:
        assert (status, retry_after) == (429, "1"), (status, body)
        body = json.loads(body)
        assert body["error"]["type"] == "rate_limit_error"
        assert body["error"]["code"] == "gateway_overflow"
    served = [r for r in results if r[0] == 200]
    assert served and all(r[3] for r in served)  # each stream whole, to its [DONE]
