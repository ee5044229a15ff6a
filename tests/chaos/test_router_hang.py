"""A hung router (SIGSTOP) of two, under load from clients that resume
(`ResumingStream`): its streams do not break, they go quiet. Envoy's health check
takes the router out of rotation within about two seconds; each client whose
stream brings nothing for `stall_s` cancels it and resumes through the gateway,
which sends it to the other router. Every request completes with a fault-free
run's tokens, and the stopped router serves again after SIGCONT."""
import json
import os
import signal
import threading
import time

import pytest

from chaos.load import (NO_TTFT_BUDGET, InFlight, metric, replica_serving,
                        run_resuming_load)
from integration.mesh_fixture import Mesh, serving, wait_until

STALL_S = 3.0
STOP_S = 8.0


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("router-hang"), admission=NO_TTFT_BUDGET,
             routers=2, observability={"tracing": "off"})
    yield from serving(m)


def test_resuming_clients_leave_a_hung_router(mesh, workload):
    _, _, expect = workload
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["router-0"]
    on_router0 = []

    def router0_streams() -> bool:
        on_router0.append(metric(mesh, "router-0", "llmesh_requests_in_flight"))
        return on_router0[-1] >= 1
    box, in_flight = [], InFlight()
    load = threading.Thread(target=lambda: box.append(
        run_resuming_load(mesh, workload, in_flight=in_flight, stall_s=STALL_S)))
    load.start()
    hit = in_flight.strike(lambda: os.kill(pid, signal.SIGSTOP), ready=router0_streams)
    try:
        time.sleep(STOP_S if hit else 0)
    finally:
        os.kill(pid, signal.SIGCONT)
    load.join(150)
    assert not load.is_alive(), "the load hung"
    assert hit > 0 and on_router0[-1] >= 1  # router-0 was streaming when it stopped
    resumed = 0
    for i, ((status, tokens, last, attempts), exp) in enumerate(zip(box[0], expect)):
        assert status == "ok", (i, status)
        assert tokens == exp and not last.incomplete, f"request {i}: other tokens"
        resumed += attempts > 1
    assert resumed >= 1  # the hung router's streams were resumed elsewhere
    assert wait_until(lambda: replica_serving(mesh), 30)
