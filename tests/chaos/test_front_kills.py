"""kill -9 of the front door under load: a router (of two) and Envoy. Envoy retries
what had not started on the other router; a stream that broke after its first
tokens is resumed by its client (`resume_token_ids`, and the seed the stream
reported): every request completes, each with the tokens of a fault-free run."""
import pytest

from chaos.load import (NO_TTFT_BUDGET, assert_all_exact, kill_during, metric, replica_serving,
                        run_load, run_resuming_load)
from integration.mesh_fixture import Mesh, serving, wait_until


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("front"),
             admission=NO_TTFT_BUDGET, routers=2, tokenizers=1,
             observability={"tracing": "off"})
    yield from serving(m)


def _assert_exact(results, expect):
    for i, ((status, tokens, last, _), exp) in enumerate(zip(results, expect)):
        assert status == "ok", (i, status)
        assert tokens == exp, f"request {i}: other tokens than a fault-free run"
        assert not last.incomplete and last.finish_reason


def test_fault_free_run_reports_seeds_and_matches(mesh, workload):
    results = run_resuming_load(mesh, workload)
    _assert_exact(results, workload[2])
    assert all(attempts == 1 for *_, attempts in results)


@pytest.mark.parametrize("victim", ["router-0", "envoy"])
def test_front_door_kill_loses_nothing_and_changes_nothing(mesh, workload, victim):
    # router-0 dies only once it has some of the load (Envoy spreads it over two). Its
    # gauge counts requests from arrival, so the ones it held may all still be before
    # their first token (Envoy then retries them whole, and no client resumes): the kill
    # is tried again on a fresh load until one lands on a stream (at most three times).
    on_victim = ((lambda: metric(mesh, "router-0", "llmesh_requests_in_flight") >= 2)
                 if victim == "router-0" else (lambda: True))
    resumed = 0
    for _ in range(3):
        results, hit = kill_during(mesh, lambda t: run_resuming_load(mesh, workload, in_flight=t),
                                   victim, at_least=4, ready=on_victim)
        assert hit > 0
        _assert_exact(results, workload[2])
        resumed = sum(attempts > 1 for *_, attempts in results)
        if resumed:
            break
        assert wait_until(lambda: replica_serving(mesh), 30)
    assert resumed >= 1, "the kill hit no stream in three tries"
    # after recovery, plain clients are served as before
    assert wait_until(lambda: replica_serving(mesh), 30)
    assert_all_exact(run_load(mesh, workload), workload[2])
