"""The autoscaler live: a replica whose step takes a known 20 ms (the sleeping
model) gets a spike of 3x what it serves; the autoscaler scales out (the first
replica from the warm pool, at once), every request is answered (OK, or refused
with RESOURCE_EXHAUSTED at the spike's start), and once the load is gone it
scales back in after its calm spell, one replica at a time, draining them. A
second model with an autoscaler of its own scales on its own load alone."""
import asyncio
import json
import time
import urllib.request

import grpc
import pytest

from llmesh.benchmarks.overload import flood
from integration.mesh_fixture import Mesh, serving, wait_until


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("autoscale"),
             observability={"tracing": "off"}, routing={"policy": "least_loaded"},
             engine={"num_kv_blocks": 256, "probe_interval_s": 0, "bench_step_ms": 20,
                     "max_num_seqs": 4},
             autoscaler={"enabled": True, "min_replicas": 1, "max_replicas": 3, "warm_pool": 1,
                         "tick_s": 0.5, "scale_in_after_s": 2, "cooldown_s": 1},
             # a second model with an autoscaler of its own (no warm pool: cold starts)
             models=[{"name": "small", "model": str(tiny_model_dir), "autoscaler": {
                 "enabled": True, "min_replicas": 1, "max_replicas": 2, "tick_s": 0.5,
                 "scale_in_after_s": 2, "cooldown_s": 1}}])
    yield from serving(m)


def _state(mesh) -> dict:
    return json.loads((mesh.run_dir / "state.json").read_text())


def _decisions(mesh, file: str = "autoscaler.jsonl") -> list[dict]:
    path = mesh.run_dir / file
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_spike_scales_out_from_the_warm_pool_and_back_in_when_calm(mesh):
    assert wait_until(lambda: len(_state(mesh)["warm_pool"]) == 1, 60), mesh.logs()
    assert _state(mesh)["replicas"] == 1
    t0 = time.monotonic()
    # 30 req/s of 20 tokens for 4 s: 3x what one replica of 4 slots at 20 ms a step serves
    results = asyncio.run(flood(mesh.endpoint, 30.0, 4.0, 2, 20))
    statuses = {a["status"] for a in results}
    assert statuses <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert sum(a["status"] == "OK" for a in results) > len(results) // 2
    outs = [d for d in _decisions(mesh) if d["action"] == "out"]
    assert outs, mesh.logs()
    assert outs[0]["rule"] in ("ttft", "load", "kv") and outs[0]["reason"]
    assert _state(mesh)["autoscaler"]["to"] >= 2
    joins = _state(mesh)["joins"]
    assert joins[0]["start"] == "warm" and joins[0]["seconds"] < 1.0, joins
    # calm again: back to one replica, one at a time
    assert wait_until(lambda: _state(mesh)["replicas"] == 1, 60), _decisions(mesh)
    ins = [d for d in _decisions(mesh) if d["action"] == "in"]
    assert ins and all(d["desired"] == d["current"] - 1 and d["rule"] == "calm" for d in ins)
    port = mesh.config["observability"]["metrics_ports"]["autoscaler"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'llmesh_autoscaler_decisions_total{action="out"' in text
    assert time.monotonic() - t0 < 120
    # (a request after all that is served)
    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    with grpc.insecure_channel(mesh.endpoint) as ch:
        out = inference_pb2_grpc.InferenceStub(ch).Complete(inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
            sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=30)
    assert len(out.choices[0].token_ids) == 3


def test_a_second_model_scales_on_its_own_load(mesh):
    from llmesh.benchmarks import kit

    def make(i: int):
        req = kit.request([0] + [(13 * i + 7 * j) % 2900 + 5 for j in range(40)], 20, 2)
        req.model = "small"
        return req
    assert _state(mesh)["models"]["small"]["replicas"] == 1
    results = asyncio.run(kit.load(mesh.endpoint, make, count=120, rate=30.0, timeout_s=300))
    assert {a["status"] for a in results} <= {"OK", "RESOURCE_EXHAUSTED"}
    outs = [d for d in _decisions(mesh, "autoscaler-small.jsonl") if d["action"] == "out"]
    assert outs and outs[0]["desired"] == 2, mesh.logs()
    # the top-level model saw none of it
    assert not [d for d in _decisions(mesh) if d["t"] >= outs[0]["t"] and d["action"] == "out"]
    assert _state(mesh)["models"]["default"]["replicas"] == 1
    assert wait_until(lambda: _state(mesh)["models"]["small"]["replicas"] == 1, 60)
    port = mesh.config["observability"]["metrics_ports"]["autoscaler"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'llmesh_autoscaler_decisions_total{action="out",model="small"' in text
