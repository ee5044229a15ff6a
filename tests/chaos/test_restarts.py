"""kill -9 of the processes that hold engine state, under load: no request fails,
none is answered with tokens other than a fault-free run's, and the kvcache
index follows the scheduler's pool through restarts of either."""
import contextlib
import json
import os
import random
import signal
import time

import grpc
import pytest

from chaos.load import (NO_TTFT_BUDGET, assert_all_exact, kill_during, make_choices_workload,
                        metric, replica_serving, router_migrations, run_choices_load, run_load,
                        run_text_load, run_tokenize_load, scheduler_stats)
from integration.mesh_fixture import Mesh, serving, wait_until
from llmesh.v1 import kvcache_pb2, kvcache_pb2_grpc



@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    # (1-token suffixes draft: the speculating third of the workload drafts often)
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("chaos"),
             admission=NO_TTFT_BUDGET, observability={"tracing": "off"},
             engine={"speculative_ngram_min": 1})
    yield from serving(m)


def test_fault_free_run_matches_the_engine(mesh, workload):
    drafts = metric(mesh, "scheduler-0", "llmesh_spec_draft_tokens_total")
    assert_all_exact(run_load(mesh, workload), workload[2])
    assert metric(mesh, "scheduler-0", "llmesh_spec_draft_tokens_total") > drafts


def test_executor_kill_loses_nothing_and_changes_nothing(mesh, workload):
    """The running requests are requeued and recomputed on the restarted executor;
    the prefix cache that pointed into the dead executor's memory is dropped."""
    before = scheduler_stats(mesh)
    results, hit = kill_during(mesh, lambda t: run_load(mesh, workload, in_flight=t),
                               "executor-0-0")
    assert hit > 0
    assert_all_exact(results, workload[2])
    assert wait_until(lambda: replica_serving(mesh), 30)
    stats = scheduler_stats(mesh)
    assert stats.num_kv_resets == before.num_kv_resets + 1
    assert stats.num_requeued > before.num_requeued
    # after recovery: the same tokens, with the prefix cache rebuilt on the new KV
    assert_all_exact(run_load(mesh, workload), workload[2])
    assert scheduler_stats(mesh).prefix_hit_rate > 0


def test_scheduler_kill_loses_nothing_and_changes_nothing(mesh, workload):
    """The router moves every request the dead scheduler held (resubmitted as prompt
    + the tokens already streamed) to the restarted one, and holds new ones until it
    is back: every client gets its whole answer, identical to a fault-free run."""
    moved = router_migrations(mesh)
    results, hit = kill_during(mesh, lambda t: run_load(mesh, workload, in_flight=t),
                               "scheduler-0")
    assert hit > 0
    assert_all_exact(results, workload[2])
    assert router_migrations(mesh) > moved  # the streams in flight were moved
    assert wait_until(lambda: replica_serving(mesh), 30)
    assert_all_exact(run_load(mesh, workload), workload[2])


def test_scheduler_kill_moves_n_gt_1_requests_choice_by_choice(mesh, tiny_model):
    """An n > 1 request moves as its unfinished choices, each resubmitted after the
    tokens its client has: every choice of every request is the fault-free run's."""
    workload = make_choices_workload(tiny_model)
    assert run_choices_load(mesh, workload) == [("ok", exp, False) for exp in workload[2]]
    moved = router_migrations(mesh)
    results, hit = kill_during(mesh, lambda t: run_choices_load(mesh, workload, in_flight=t),
                               "scheduler-0")
    assert hit > 0
    for i, ((status, choices, incomplete), exp) in enumerate(zip(results, workload[2])):
        assert (status, incomplete) == ("ok", False), (i, status)
        assert choices == exp, f"request {i}: OK with other tokens than a fault-free run"
    assert router_migrations(mesh) > moved  # (the kill caught requests mid-stream)
    assert wait_until(lambda: replica_serving(mesh), 30)


def test_tokenizer_kill_loses_nothing(mesh):
    """Encoding has no side effects: a call the tokenizer's death cuts off is made
    again, against the restarted tokenizer. The tokenizer is stopped while a load of
    long texts starts, so calls are waiting at it when it is killed; the router's
    retry counter shows the kill cut them off."""
    rng = random.Random(5)
    words = "lighthouse keeper climbed stairs lamp storm harbour ship night rope".split()
    texts = [" ".join(rng.choices(words, k=20_000)) + f" {i}" for i in range(48)]
    expect = run_tokenize_load(mesh, texts)
    assert all(status == "ok" and ids for status, ids in expect)
    retries = metric(mesh, "router-0", "llmesh_tokenizer_retries_total")
    # stopped first, so that the calls in flight wait at the tokenizer when it dies
    pid = json.loads((mesh.run_dir / "state.json").read_text())["pids"]["tokenizer-0"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results, hit = kill_during(mesh, lambda t: run_tokenize_load(mesh, texts, in_flight=t),
                                   "tokenizer-0", at_least=4,
                                   ready=lambda: time.monotonic() - stopped_at > 0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (if the kill never came)
            os.kill(pid, signal.SIGCONT)
    assert hit > 0
    assert results == expect
    assert metric(mesh, "router-0", "llmesh_tokenizer_retries_total") > retries, \
        "the kill cut off no Encode call"
    # text requests (Encode, then generation) are served by the restarted tokenizer
    prompts = [f"The lighthouse keeper number {i} climbed the stairs" for i in range(8)]
    assert all(status == "ok" and len(tokens) == 16
               for status, tokens in run_text_load(mesh, prompts))


def _match(mesh, tokens) -> dict:
    """What the kvcache index says each replica holds of `tokens` ({} when it is down)."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.config['kvcache_port']}") as ch:
            resp = kvcache_pb2_grpc.KVCacheStub(ch).Match(
                kvcache_pb2.MatchRequest(token_ids=tokens), timeout=2)
        return {r.replica: r.num_blocks for r in resp.replicas}
    except grpc.RpcError:
        return {}


def test_kvcache_index_follows_the_pool_through_restarts(mesh, workload):
    """The index answers from the scheduler's block events; a restarted index is
    resynchronised from a snapshot, and a restarted scheduler's old blocks leave it."""
    prompts = workload[0]
    system = prompts[0][:48]  # 3 full blocks of the shared system prompt
    assert_all_exact(run_load(mesh, workload), workload[2])
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 5)
    # a prompt nobody sent shares nothing
    assert _match(mesh, [0] + [7] * 47).get("replica-0") == 0
    # the index dies while the scheduler publishes block events (a load streaming) and
    # restarts empty; the load does not notice (the index is off the request path) ...
    results, hit = kill_during(mesh, lambda t: run_load(mesh, workload, in_flight=t), "kvcache")
    assert hit > 0
    assert_all_exact(results, workload[2])
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 30), mesh.logs()
    pids = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    os.kill(pids["scheduler-0"], signal.SIGKILL)  # ... its pool is gone, and so are its blocks
    assert wait_until(lambda: _match(mesh, system).get("replica-0", 0) == 0, 30)
    assert wait_until(lambda: replica_serving(mesh), 30)
    assert_all_exact(run_load(mesh, workload), workload[2])
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 5)
