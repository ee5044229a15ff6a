"""A hung executor (SIGSTOP) under load: the scheduler's step watchdog notices,
the replica goes NOT_SERVING (and the router with it), and when the executor
runs again every request completes with the tokens of a fault-free run."""
import json
import os
import signal
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

from chaos.load import NO_TTFT_BUDGET, InFlight, assert_all_exact, run_load, scheduler_stats
from integration.mesh_fixture import Mesh, health_status, serving, wait_until

STOP_S = 8.0


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("hang"),
             admission=NO_TTFT_BUDGET, observability={"tracing": "off"},
             engine={"num_kv_blocks": 512, "step_timeout_s": 2.0})
    yield from serving(m)


def test_a_stopped_executor_is_detected_and_its_requests_complete(mesh, workload):
    before = scheduler_stats(mesh)
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["executor-0-0"]
    port = mesh.config["replica_ports"][0]["scheduler"]
    router_port = mesh.config["router_ports"][0]
    box, seen, seen_router, in_flight = [], [], [], InFlight()
    load = threading.Thread(target=lambda: box.append(run_load(mesh, workload, in_flight=in_flight)))
    load.start()
    hit = in_flight.strike(lambda: os.kill(pid, signal.SIGSTOP))
    try:
        deadline = time.monotonic() + STOP_S
        while hit and time.monotonic() < deadline:  # bounded: the stop's length
            seen.append(health_status(port))
            seen_router.append(health_status(router_port))
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    load.join(120)
    assert not load.is_alive(), "the load hung"
    assert hit > 0, "the load ended before its requests streamed"
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen  # the watchdog saw it
    # the router follows the scheduler's health: with its only replica out, it says so
    # (Envoy's check), and new requests wait for the replica instead of queueing on it
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen_router, seen_router
    assert_all_exact(box[0], workload[2])
    after = scheduler_stats(mesh)
    assert after.num_kv_resets > before.num_kv_resets and after.num_requeued > before.num_requeued
    for p in (port, router_port):
        assert wait_until(lambda: health_status(p) == health_pb2.HealthCheckResponse.SERVING, 30)
