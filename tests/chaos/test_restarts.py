"""kill -9 of the processes that hold engine state, under load: no request is ever
answered OK with tokens other than a fault-free run's, and the kvcache index
follows the scheduler's pool through restarts of either."""
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from integration.mesh_fixture import Mesh, serving, wait_until
from llmesh.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, kvcache_pb2,
                       kvcache_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc)
from mesh.supervisor import is_serving
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig

NUM_REQUESTS = 40


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("chaos"), observability={"tracing": "off"})
    yield from serving(m)


@pytest.fixture(scope="module")
def workload(tiny_model):
    """40 prompts sharing a 3-block system prefix (prefix-cache hits), half greedy and
    half seeded, with the tokens the in-process engine gives them."""
    rng = random.Random(11)
    system = [0] + rng.choices(range(5, 3000), k=50)
    prompts = [system + rng.choices(range(5, 3000), k=rng.randint(1, 40))
               for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(max_tokens=rng.randint(20, 48), ignore_eos=True, seed=500 + i,
                             temperature=0.9 if i % 2 else 0.0, top_p=0.95)
              for i in range(NUM_REQUESTS)]
    expect = [c[0].token_ids for c in Engine(tiny_model, EngineConfig()).generate(prompts, params)]
    return prompts, params, expect


def _run(mesh, workload, concurrency=8):
    """Every request once; per request ("ok", tokens) or (status, tokens so far, last chunk)."""
    prompts, params, _ = workload

    def call(i):
        p = params[i]
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompts[i]), sampling=common_pb2.SamplingParams(
                max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                ignore_eos=True))
        chunks = []
        try:
            with grpc.insecure_channel(mesh.endpoint) as ch:
                for chunk in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60):
                    chunks.append(chunk)
        except grpc.RpcError as e:
            return e.code(), [t for c in chunks for t in c.token_ids], chunks[-1] if chunks else None
        return "ok", [t for c in chunks for t in c.token_ids], chunks[-1]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(call, range(len(prompts))))


def _kill_during_load(mesh, workload, victim: str, after_s: float = 1.0):
    pids = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    box = []
    load = threading.Thread(target=lambda: box.append(_run(mesh, workload)))
    load.start()
    time.sleep(after_s)
    os.kill(pids[victim], signal.SIGKILL)
    load.join(120)
    assert not load.is_alive(), "the load hung"
    assert wait_until(lambda: json.loads((mesh.run_dir / "state.json").read_text())["pids"]
                      [victim] != pids[victim], 30), f"{victim} was not restarted"
    return box[0]


def _replica_serving(mesh) -> bool:
    """The scheduler is SERVING and a request through Envoy completes."""
    if not is_serving(mesh.config["replica_ports"][0]["scheduler"]):
        return False
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
                                        sampling=common_pb2.SamplingParams(max_tokens=1))
    try:
        with grpc.insecure_channel(mesh.endpoint) as ch:
            inference_pb2_grpc.InferenceStub(ch).Complete(req, timeout=10)
        return True
    except grpc.RpcError:
        return False


def _stats(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=5)


def _assert_all_exact(results, expect):
    for i, ((status, tokens, last), exp) in enumerate(zip(results, expect)):
        assert status == "ok", (i, status)
        assert tokens == exp, f"request {i}: OK with other tokens than a fault-free run"
        assert not last.incomplete


def test_fault_free_run_matches_the_engine(mesh, workload):
    _assert_all_exact(_run(mesh, workload), workload[2])


def test_executor_kill_loses_nothing_and_changes_nothing(mesh, workload):
    """The running requests are requeued and recomputed on the restarted executor;
    the prefix cache that pointed into the dead executor's memory is dropped."""
    before = _stats(mesh)
    results = _kill_during_load(mesh, workload, "executor-0-0")
    _assert_all_exact(results, workload[2])
    assert wait_until(lambda: _replica_serving(mesh), 30)
    stats = _stats(mesh)
    assert stats.num_kv_resets == before.num_kv_resets + 1
    assert stats.num_requeued > before.num_requeued
    # after recovery: the same tokens, with the prefix cache rebuilt on the new KV
    _assert_all_exact(_run(mesh, workload), workload[2])
    assert _stats(mesh).prefix_hit_rate > 0


def test_scheduler_kill_never_answers_ok_with_other_tokens(mesh, workload):
    results = _kill_during_load(mesh, workload, "scheduler-0")
    for i, ((status, tokens, last), exp) in enumerate(zip(results, workload[2])):
        if status == "ok":
            assert tokens == exp, f"request {i}: OK with other tokens than a fault-free run"
        else:  # what it streamed before the failure was right, and it says it is incomplete
            assert status == grpc.StatusCode.UNAVAILABLE, (i, status)
            assert tokens == exp[:len(tokens)]
            assert last is None or last.incomplete
    assert wait_until(lambda: _replica_serving(mesh), 30)
    _assert_all_exact(_run(mesh, workload), workload[2])


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
    _assert_all_exact(_run(mesh, workload), workload[2])
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 5)
    # a prompt nobody sent shares nothing
    assert _match(mesh, [0] + [7] * 47).get("replica-0") == 0
    pids = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    os.kill(pids["kvcache"], signal.SIGKILL)  # the index restarts empty ...
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 30), mesh.logs()
    os.kill(pids["scheduler-0"], signal.SIGKILL)  # ... its pool is gone, and so are its blocks
    assert wait_until(lambda: _match(mesh, system).get("replica-0", 0) == 0, 30)
    assert wait_until(lambda: _replica_serving(mesh), 30)
    _assert_all_exact(_run(mesh, workload), workload[2])
    assert wait_until(lambda: _match(mesh, system).get("replica-0") == 3, 5)
