"""The leak watchdog under load: an executor that keeps memory every step and a
scheduler that loses KV blocks (test-only flags, set off by SIGUSR1) are drained
and restarted, and no request fails or comes back different."""
import json
import os
import signal

import pytest

from chaos.load import NO_TTFT_BUDGET, assert_all_exact, replica_serving, run_load
from integration.mesh_fixture import Mesh, serving, wait_until


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("leaks"),
             admission=NO_TTFT_BUDGET, observability={"tracing": "off"},
             engine={"num_kv_blocks": 512, "probe_interval_s": 0,
                     "leak_check_s": 0.5, "leak_warmup_s": 2, "leak_idle_s": 2,
                     "leak_rss_growth": 0.05,
                     "test_leak_mb_per_step": 8, "test_leak_kv_blocks": 3},
             routing={"replica_wait_s": 60})
    yield from serving(m)


def _pids(mesh) -> dict:
    return json.loads((mesh.run_dir / "state.json").read_text())["pids"]


def _log(mesh, name: str) -> str:
    return (mesh.run_dir / "logs" / f"{name}.log").read_text()


def test_leaking_executors_are_drained_and_restarted_under_load(mesh, workload):
    """8 MiB kept per step: past 256 MiB over its baseline (32 steps) the replica
    drains (running requests finish, new ones wait at the router) and the executor
    restarts, as often as it leaks; every answer equals a fault-free run's."""
    before = _pids(mesh)
    os.kill(before["executor-0-0"], signal.SIGUSR1)
    assert_all_exact(run_load(mesh, workload), workload[2])
    # the restart follows the drain, which may end with the load's last requests
    assert wait_until(lambda: _pids(mesh)["executor-0-0"] != before["executor-0-0"], 30), \
        mesh.logs()
    log = _log(mesh, "scheduler-0")
    assert "leak watchdog: executor-rank0 RSS" in log and "restarting the executors" in log
    assert "the scheduler drained this replica to restart it" in _log(mesh, "executor-0-0")


def test_kv_blocks_lost_while_idle_restart_the_scheduler(mesh, workload):
    """Blocks still allocated 2 s after the last request: the scheduler (whose pool
    lost them) restarts, with a fresh pool, and serves the same answers."""
    pid = _pids(mesh)["scheduler-0"]
    os.kill(pid, signal.SIGUSR1)
    assert wait_until(lambda: _pids(mesh)["scheduler-0"] != pid, 30), mesh.logs()
    assert "KV blocks stay allocated with no request queued or running" in _log(mesh,
                                                                                "scheduler-0")
    assert wait_until(lambda: replica_serving(mesh), 30)
    assert_all_exact(run_load(mesh, workload), workload[2])
