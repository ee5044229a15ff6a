"""The router's circuit breaker in a mesh: replica-0 fails every other request it is
sent (answered at once as failed with no tokens, what a replica that lost a request
sends) while its health check passes. The router moves each failed request to
replica-1, its breaker opens and keeps new requests away from replica-0, and
after replica-0 recovers (SIGUSR2 ends the fault) a trial request closes the
breaker and replica-0 serves again. No request fails or changes its tokens."""
import json
import os
import signal

import pytest

from chaos.load import (NO_TTFT_BUDGET, assert_all_exact, metric, router_migrations, run_load,
                        scheduler_stats)
from integration.mesh_fixture import Mesh, serving, wait_until


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("breaker"), admission=NO_TTFT_BUDGET,
             replicas=2, observability={"tracing": "off"},
             # round robin: replica-0 is offered requests whenever its breaker lets it
             routing={"test_half_failing_replica": 0, "policy": "round_robin"},
             engine={"num_kv_blocks": 512, "probe_interval_s": 0})
    yield from serving(m)


def _breaker(mesh, name: str) -> float:
    return metric(mesh, "router-0", f'llmesh_router_{name}')


def test_a_half_failing_replica_is_bypassed_then_readmitted(mesh, workload):
    moved = router_migrations(mesh)
    assert_all_exact(run_load(mesh, workload), workload[2])
    assert router_migrations(mesh) > moved  # replica-0's failures landed on requests ...
    assert _breaker(mesh, "breaker_opened_total") >= 1  # ... and opened its breaker
    # replica-0 recovers; the next trial request closes the breaker and it serves again
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["scheduler-0"]
    os.kill(pid, signal.SIGUSR2)
    before = scheduler_stats(mesh, 0).num_admitted
    small = tuple(part[:16] for part in workload)
    rounds = 0

    def readmitted() -> bool:
        nonlocal rounds
        rounds += 1
        assert_all_exact(run_load(mesh, small), small[2])
        return (_breaker(mesh, "breaker_open") == 0
                and scheduler_stats(mesh, 0).num_admitted > before)
    assert wait_until(readmitted, 60, interval_s=0.5), f"not readmitted after {rounds} loads"
    moved = router_migrations(mesh)
    assert_all_exact(run_load(mesh, small), small[2])
    assert router_migrations(mesh) == moved  # recovered: nothing fails any more
