"""Replicas that come and go at run time (`llmesh scale`): under a seeded load
through Envoy, 3 replicas become 5 and then 2; no request fails, none is
duplicated or changed, the new replicas serve, the removed ones' processes are
gone, and Envoy keeps its pid."""
import json
import threading
import time

import grpc
import pytest

from chaos.load import make_workload, run_load
from integration.mesh_fixture import Mesh, _alive, serving, wait_until
from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("scale"), replicas=3, routers=2,
             observability={"tracing": "off"},
             engine={"num_kv_blocks": 256, "probe_interval_s": 0},
             routing={"policy": "least_loaded"})  # (spread: every replica gets load)
    yield from serving(m)


def _state(mesh) -> dict:
    return json.loads((mesh.run_dir / "state.json").read_text())


def _steps(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=5).num_steps


def test_scale_out_and_in_under_load_loses_nothing(mesh, tiny_model):
    workload = make_workload(tiny_model)
    envoy_pid = _state(mesh)["pids"]["envoy"]
    results, done = [], threading.Event()

    def load():  # bounded: stops when scaling is done, or after 150 s
        until = time.monotonic() + 150
        while not done.is_set() and time.monotonic() < until:
            results.append(run_load(mesh, workload, concurrency=6))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        out = mesh.cli("scale", "--replicas", "5", timeout=200)
        assert out.returncode == 0, out.stderr + mesh.logs()
        grown = _state(mesh)
        assert grown["replicas"] == 5 and len(grown["config"]["replica_ports"]) == 5
        added = [p for p in grown["config"]["replica_ports"] if p["index"] >= 3]
        assert sorted(p["index"] for p in added) == [3, 4]  # (they start side by side)
        assert wait_until(lambda: all(_steps(p["scheduler"]) > 0 for p in added), 10), \
            "a new replica got nothing"
        out = mesh.cli("scale", "--replicas", "2", timeout=300)
        assert out.returncode == 0, out.stderr + mesh.logs()
        time.sleep(1.0)
    finally:
        done.set()
        thread.join(200)
    assert not thread.is_alive(), "the load hung"
    shrunk = _state(mesh)
    assert shrunk["replicas"] == 2
    assert [p["index"] for p in shrunk["config"]["replica_ports"]] == [0, 1]
    gone = [n for n in grown["pids"] if n.startswith(("scheduler-", "executor-"))
            and n not in shrunk["pids"]]
    assert sorted(gone) == ["executor-2-0", "executor-3-0", "executor-4-0",
                            "scheduler-2", "scheduler-3", "scheduler-4"]
    assert not any(_alive(grown["pids"][n]) for n in gone)
    assert shrunk["pids"]["envoy"] == envoy_pid
    assert len(results) >= 2
    for run in results:
        for i, ((status, tokens, last), exp) in enumerate(zip(run, workload[2])):
            assert status == "ok", (i, status)
            assert tokens == exp and not last.incomplete, f"request {i}: other tokens"
