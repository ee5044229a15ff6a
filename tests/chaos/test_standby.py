"""Warm standby (routing.standby_replicas: 1 of 2 replicas): it takes no requests
while the regular replica serves; when that one hangs (SIGSTOP) the router sends
new requests to the standby at once, every request completes with a fault-free
run's tokens, and once the regular replica is back the standby is idle again."""
import json
import os
import signal
import time

import pytest
from grpc_health.v1 import health_pb2

from chaos.load import NO_TTFT_BUDGET, assert_all_exact, run_load
from integration.mesh_fixture import Mesh, health_status, serving, wait_until
from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

import grpc


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("standby"),
             admission=NO_TTFT_BUDGET, replicas=2,
             routing={"standby_replicas": 1}, observability={"tracing": "off"},
             engine={"num_kv_blocks": 512, "step_timeout_s": 2.0, "probe_interval_s": 0})
    yield from serving(m)


def _steps(mesh, replica: int) -> int:
    port = mesh.config["replica_ports"][replica]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=5).num_steps


def test_standby_serves_only_while_the_regular_replica_is_out(mesh, workload):
    small = (workload[0][:12], workload[1][:12], workload[2][:12])
    standby0 = _steps(mesh, 1)
    assert_all_exact(run_load(mesh, small), small[2])
    assert _steps(mesh, 1) == standby0, "the standby took requests while not needed"

    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["executor-0-0"]
    port0 = mesh.config["replica_ports"][0]["scheduler"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # the regular replica hangs; the first request on it trips the step watchdog
        assert_all_exact(run_load(mesh, small), small[2])
        assert health_status(port0) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _steps(mesh, 1) > standby0, "the standby took nothing while it was needed"
        t0 = time.monotonic()
        assert_all_exact(run_load(mesh, small), small[2])  # straight to the standby
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: health_status(port0) == health_pb2.HealthCheckResponse.SERVING, 30)
    # the regular replica's circuit breaker opened on the requests that left it: it gets
    # requests again after a successful trial (1 s later), and then the standby idles
    one = (small[0][:1], small[1][:1], small[2][:1])

    def regular_again() -> bool:
        before = _steps(mesh, 1)
        assert_all_exact(run_load(mesh, one), one[2])
        return _steps(mesh, 1) == before

    assert wait_until(regular_again, 30)
    standby1 = _steps(mesh, 1)
    assert_all_exact(run_load(mesh, small), small[2])
    assert _steps(mesh, 1) == standby1, "the standby still took requests after recovery"
