"""The mesh with `tensor_parallel: 2`: two executor ranks (a gloo group) per replica."""
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmesh.v1 import common_pb2, inference_pb2, scheduler_pb2, scheduler_pb2_grpc
from mesh_fixture import Mesh, _alive, health_status, serving, wait_until
from grpc_health.v1 import health_pb2
from llmesh.mesh.supervisor import is_serving
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("tp-mesh"), tensor_parallel=2)
    yield from serving(m)


def _stats(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=5)


def _live_pids(mesh) -> dict:
    return json.loads((mesh.run_dir / "state.json").read_text())["pids"]


def test_two_ranks_serve_and_match_tp1_for_concurrent_requests(mesh, stub, tiny_model):
    assert len(mesh.config["replica_ports"][0]["executors"]) == 2
    assert {"executor-0-0", "executor-0-1"} <= set(mesh.state["pids"])
    rng = random.Random(9)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(2, 120)) for _ in range(16)]
    lengths = [rng.randint(4, 30) for _ in prompts]
    seeded = common_pb2.SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3,
                                       ignore_eos=True)

    def call(i):
        sampling = (seeded if i % 4 == 0 else common_pb2.SamplingParams(
            max_tokens=lengths[i], temperature=0.0, ignore_eos=True))
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=prompts[i]),
                                            sampling=sampling)
        chunks = list(stub.Generate(req, timeout=120))
        return [t for c in chunks for t in c.token_ids], chunks[-1]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
              if i % 4 == 0 else SamplingParams(max_tokens=n, ignore_eos=True)
              for i, n in enumerate(lengths)]
    expect = Engine(tiny_model, EngineConfig()).generate(prompts, params)
    for (tokens, last), exp in zip(results, expect):
        assert tokens == exp[0].token_ids
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and not last.incomplete
    stats = _stats(mesh)
    assert stats.tensor_parallel == 2 and stats.comm_s > 0
    assert wait_until(lambda: _stats(mesh).num_used_blocks == 0, 5)


def test_kill_one_rank_under_load_restarts_the_group_and_requests_resume(mesh, stub, tiny_model):
    """The killed rank takes the group down; the scheduler requeues what ran and
    recomputes it on the restarted group: every request completes with the tokens
    of a fault-free run."""
    before = _live_pids(mesh)
    rng = random.Random(21)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(20, 60)) for _ in range(6)]
    params = [SamplingParams(max_tokens=160, ignore_eos=True, temperature=0.8 if i % 2 else 0.0,
                             seed=40 + i) for i in range(6)]
    outcomes: list = [None] * 6
    started = threading.Barrier(7, timeout=60)

    def call(i):
        p = params[i]
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=prompts[i]), sampling=common_pb2.SamplingParams(
                max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, ignore_eos=True))
        chunks = []
        try:
            for chunk in stub.Generate(req, timeout=90):
                chunks.append(chunk)
                if len(chunks) == 3:
                    started.wait()
            outcomes[i] = ("ok", chunks)
        except grpc.RpcError as e:
            outcomes[i] = (e.code(), chunks)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    sched_port = mesh.config["replica_ports"][0]["scheduler"]
    seen: list = []
    stop_polling = threading.Event()

    def poll_health():  # bounded: stops when told or after 120 s
        deadline = time.monotonic() + 120
        while not stop_polling.is_set() and time.monotonic() < deadline:
            seen.append(health_status(sched_port))
            time.sleep(0.05)

    started.wait()  # every request is streaming
    poller = threading.Thread(target=poll_health)
    poller.start()
    os.kill(before["executor-0-1"], signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    expect = Engine(tiny_model, EngineConfig()).generate(prompts, params)
    for (code, chunks), exp in zip(outcomes, expect):
        assert code == "ok", code
        assert [t for c in chunks for t in c.token_ids] == exp[0].token_ids
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert not chunks[-1].incomplete
    # the whole group was restarted (rank 0 too), and the replica serves again
    assert wait_until(lambda: all(_live_pids(mesh)[f"executor-0-{r}"] != before[f"executor-0-{r}"]
                                  for r in (0, 1)), 30)
    assert not _alive(before["executor-0-0"])
    assert wait_until(lambda: is_serving(sched_port), 60), mesh.logs()
    stop_polling.set()
    poller.join(5)
    # the replica said NOT_SERVING while its group was down (the scheduler itself lived on)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen[:20]
    assert _live_pids(mesh)["scheduler-0"] == before["scheduler-0"]
    stats = _stats(mesh)
    assert stats.num_kv_resets >= 1 and stats.num_requeued >= 6  # each request was requeued
    assert wait_until(lambda: _stats(mesh).num_used_blocks == 0, 5)
