"""The gateway's own limit (`envoy.max_requests_per_s`): what comes faster is refused
by Envoy itself, at once, before any router sees it (gRPC RESOURCE_EXHAUSTED, HTTP
429, each with a retry hint); what it lets through is served whole."""
import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request

import grpc
import pytest

from integration.mesh_fixture import Mesh, envoy_counters, serving
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

RATE = 10
BURST = 10
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("gateway-limit"),
             observability={"tracing": "off"},
             envoy={"max_requests_per_s": RATE, "rate_limit_burst": BURST},
             engine={"num_kv_blocks": 512, "bench_step_ms": 5.0, "probe_interval_s": 0})
    yield from serving(m)


def _envoy_limited(mesh) -> int:
    return sum(v for k, v in envoy_counters(mesh, "local_rate_limit").items()
               if "rate_limited" in k)


def _router_requests(mesh) -> float:
    port = mesh.config["observability"]["metrics_ports"]["router-0"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmesh_requests_total{"))


async def _flood(endpoint: str, count: int, every_s: float):
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(i: int):
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=[0, 5 + i, 7, 9]),
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            t0 = time.monotonic()
            try:
                out = await stub.Complete(req, timeout=60)
            except grpc.aio.AioRpcError as e:
                return (e.code().name, time.monotonic() - t0,
                        dict(e.trailing_metadata() or ()).get("retry-after-ms"))
            assert len(out.token_ids) == MAX_TOKENS
            return "OK", time.monotonic() - t0, None

        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(every_s)
        return await asyncio.gather(*tasks)


def test_grpc_beyond_the_rate_is_refused_by_envoy_at_once(mesh):
    limited, routed = _envoy_limited(mesh), _router_requests(mesh)
    results = asyncio.run(_flood(mesh.endpoint, 80, 0.005))  # ~200 req/s for 0.4 s
    ok = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] != "OK"]
    assert {r[0] for r in refused} == {"RESOURCE_EXHAUSTED"}
    assert all(r[2] == "1000" for r in refused)  # the retry hint
    # the bucket's burst and what refills during the flood, and no more
    assert BURST <= len(ok) <= BURST + RATE * 2
    assert _envoy_limited(mesh) - limited == len(refused)
    assert statistics.median(r[1] for r in refused) < 0.05
    # no router saw the refused ones
    time.sleep(0.5)
    assert _router_requests(mesh) - routed == len(ok)


def test_http_beyond_the_rate_is_429_with_retry_after(mesh):
    time.sleep(BURST / RATE + 0.5)  # (the bucket full again)
    statuses = []
    for i in range(BURST + 10):
        req = urllib.request.Request(
            f"http://{mesh.endpoint}/v1/completions",
            data=json.dumps({"model": "default", "prompt": "Hi", "max_tokens": 2}).encode(),
            headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                statuses.append((resp.status, None))
        except urllib.error.HTTPError as e:
            statuses.append((e.code, e.headers.get("retry-after")))
    assert any(s == 200 for s, _ in statuses)
    limited = [(s, h) for s, h in statuses if s != 200]
    assert limited and all(s == 429 and h == "1" for s, h in limited)
