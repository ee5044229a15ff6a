"""A hung scheduler (SIGSTOP) of two replicas, under load: its Connect stream to the
router stays open but goes silent, so nothing but silence can tell it from a slow
one. The router counts a replica silent for `routing.replica_silence_s` as lost:
the requests streaming from it move to the other replica, every request completes
with a fault-free run's tokens, and once the scheduler runs again (SIGCONT) it
reconnects and serves."""
import json
import os
import signal
import threading
import time

import grpc
import pytest

from chaos.load import (NO_TTFT_BUDGET, InFlight, assert_all_exact, router_migrations,
                        run_load)
from integration.mesh_fixture import Mesh, serving, wait_until
from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

SILENCE_S = 2.0
STOP_S = 6.0


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("hung-scheduler"), admission=NO_TTFT_BUDGET,
             replicas=2, observability={"tracing": "off"},
             routing={"policy": "round_robin", "replica_silence_s": SILENCE_S},
             engine={"num_kv_blocks": 512, "probe_interval_s": 0})
    yield from serving(m)


def _admitted(mesh, replica: int) -> int:
    port = mesh.config["replica_ports"][replica]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=5).num_admitted


def test_a_silent_scheduler_is_lost_and_its_requests_move(mesh, workload):
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["scheduler-0"]
    moved = router_migrations(mesh)
    box, in_flight = [], InFlight()
    load = threading.Thread(target=lambda: box.append(run_load(mesh, workload, in_flight=in_flight)))
    load.start()
    hit = in_flight.strike(lambda: os.kill(pid, signal.SIGSTOP), at_least=4)
    try:
        time.sleep(STOP_S if hit else 0)  # (the router gives up on it after SILENCE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    load.join(120)
    assert not load.is_alive(), "the load hung"
    assert hit > 0, "the load ended before its requests streamed"
    assert router_migrations(mesh) > moved  # requests were streaming from the hung one
    assert_all_exact(box[0], workload[2])
    before = _admitted(mesh, 0)
    small = tuple(part[:8] for part in workload)

    def serves_again() -> bool:
        assert_all_exact(run_load(mesh, small), small[2])
        return _admitted(mesh, 0) > before
    assert wait_until(serves_again, 60, interval_s=0.5), "replica-0 did not come back"
