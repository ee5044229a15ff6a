"""The chaos tests' load: seeded requests with known answers, run through a mesh."""
import json
import os
import random
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from llmesh.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2,
                       scheduler_pb2_grpc)
from integration.mesh_fixture import wait_until
from llmesh.mesh.client import ResumingStream
from llmesh.mesh.supervisor import is_serving
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig

NUM_REQUESTS = 40
# How long a fault test waits for its load to have streams in flight before it strikes.
IN_FLIGHT_WAIT_S = 60.0


class InFlight:
    """The load's requests as they start, stream and end, so that a fault is timed to
    land on work in flight and the test can say how much it hit: a request counts as
    streaming from its first chunk (its first byte: gRPC sends the headers with it)
    until its call returns."""

    def __init__(self):
        self._cond = threading.Condition()
        self._streaming: set[int] = set()
        self.num_done = 0
        self.at_strike: frozenset[int] = frozenset()  # the requests streaming when it struck

    def streamed(self, i: int) -> None:
        with self._cond:
            self._streaming.add(i)
            self._cond.notify_all()

    def ended(self, i: int) -> None:
        with self._cond:
            self._streaming.discard(i)
            self.num_done += 1
            self._cond.notify_all()

    def strike(self, fault, at_least: int = 2, ready=lambda: True,
               timeout_s: float = IN_FLIGHT_WAIT_S) -> int:
        """Wait (bounded) until `at_least` requests are streaming and `ready()` holds,
        then call `fault()` with no request able to end meanwhile; the number that were
        streaming when it struck (0: the load never got there, and nothing was done)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._streaming) < at_least or not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return 0
                self._cond.wait(min(left, 0.05))
            fault()
            self.at_strike = frozenset(self._streaming)
            return len(self._streaming)
# For the meshes of tests that restart parts under load: a request that waits out a
# restart at the router must not be refused for the standard class's TTFT budget
# (15 s, which a restart on a loaded 2-core box can take; seen once in CI-like runs).
# These tests check that nothing is lost or changed; SLO admission has its own.
NO_TTFT_BUDGET = {"classes": {"standard": {"ttft_budget_s": 0.0}}}


def make_workload(tiny_model):
    """40 prompts sharing a 3-block system prefix (prefix-cache hits), half greedy and
    half seeded, a third of them speculating (prompt lookup: the same tokens), with
    the tokens the in-process engine gives them."""
    rng = random.Random(11)
    system = [0] + rng.choices(range(5, 3000), k=50)
    prompts = [system + rng.choices(range(5, 3000), k=rng.randint(1, 40))
               for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(max_tokens=rng.randint(20, 48), ignore_eos=True, seed=500 + i,
                             temperature=0.9 if i % 2 else 0.0, top_p=0.95,
                             speculative_tokens=4 if i % 3 == 0 else None)
              for i in range(NUM_REQUESTS)]
    expect = [c[0].token_ids for c in Engine(tiny_model, EngineConfig()).generate(prompts, params)]
    return prompts, params, expect


def workload_request(prompt: list[int], p: SamplingParams) -> inference_pb2.GenerateRequest:
    """A workload entry as a client sends it (token ids, the seeded parameters)."""
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), sampling=common_pb2.SamplingParams(
            n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            seed=p.seed, ignore_eos=True, speculative_tokens=p.speculative_tokens))


def make_choices_workload(tiny_model, num_requests: int = 16, n: int = 3):
    """Seeded n > 1 requests with the choices the in-process engine gives them."""
    rng = random.Random(13)
    prompts = [[0] + rng.choices(range(5, 3000), k=rng.randint(10, 40))
               for _ in range(num_requests)]
    params = [SamplingParams(n=n, max_tokens=rng.randint(24, 48), ignore_eos=True,
                             seed=900 + i, temperature=0.9, top_p=0.95)
              for i in range(num_requests)]
    expect = [[c.token_ids for c in choices] for choices in
              Engine(tiny_model, EngineConfig()).generate(prompts, params)]
    return prompts, params, expect


def run_choices_load(mesh, workload, concurrency=8, in_flight: InFlight | None = None):
    """Every n > 1 request once, streamed; per request (status, tokens by choice,
    whether a chunk said incomplete)."""
    prompts, params, _ = workload
    in_flight = in_flight or InFlight()

    def call(i):
        p = params[i]
        req = workload_request(prompts[i], p)
        choices = [[] for _ in range(p.n)]
        incomplete = False
        try:
            with grpc.insecure_channel(mesh.endpoint) as ch:
                for chunk in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60):
                    choices[chunk.index].extend(chunk.token_ids)
                    incomplete |= chunk.incomplete
                    in_flight.streamed(i)
        except grpc.RpcError as e:
            return e.code(), choices, incomplete
        finally:
            in_flight.ended(i)
        return "ok", choices, incomplete

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(call, range(len(prompts))))


def _run_each(num: int, concurrency: int, in_flight: InFlight, call) -> list:
    """`call(i)` for every i < num, `concurrency` at a time: per i ("ok", what it
    returned) or (its status, [])."""
    def one(i):
        try:
            return "ok", call(i)
        except grpc.RpcError as e:
            return e.code(), []
        finally:
            in_flight.ended(i)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(num)))


def run_text_load(mesh, prompts: list[str], max_tokens: int = 16, concurrency=8,
                  in_flight: InFlight | None = None):
    """Text prompts, streamed (each goes through the tokenizer's Encode first); per
    prompt the status and the tokens."""
    in_flight = in_flight or InFlight()

    def call(i):
        req = inference_pb2.GenerateRequest(prompt=prompts[i], sampling=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        tokens = []
        with grpc.insecure_channel(mesh.endpoint) as ch:
            for chunk in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60):
                tokens.extend(chunk.token_ids)
                in_flight.streamed(i)
        return tokens

    return _run_each(len(prompts), concurrency, in_flight, call)


def run_tokenize_load(mesh, texts: list[str], concurrency=8, in_flight: InFlight | None = None):
    """Tokenize calls (the router's Encode on the tokenizer, nothing else); per text the
    status and the ids. A call counts as in flight from its start."""
    in_flight = in_flight or InFlight()

    def call(i):
        in_flight.streamed(i)
        with grpc.insecure_channel(mesh.endpoint) as ch:
            out = inference_pb2_grpc.InferenceStub(ch).Tokenize(
                inference_pb2.TokenizeRequest(text=texts[i]), timeout=60)
        return list(out.token_ids)

    return _run_each(len(texts), concurrency, in_flight, call)


def run_load(mesh, workload, concurrency=8, in_flight: InFlight | None = None):
    """Every request once; per request ("ok", tokens) or (status, tokens so far, last chunk)."""
    prompts, params, _ = workload
    in_flight = in_flight or InFlight()

    def call(i):
        p = params[i]
        req = workload_request(prompts[i], p)
        chunks = []
        try:
            with grpc.insecure_channel(mesh.endpoint) as ch:
                for chunk in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60):
                    chunks.append(chunk)
                    in_flight.streamed(i)
        except grpc.RpcError as e:
            return e.code(), [t for c in chunks for t in c.token_ids], chunks[-1] if chunks else None
        finally:
            in_flight.ended(i)
        return "ok", [t for c in chunks for t in c.token_ids], chunks[-1]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(call, range(len(prompts))))


def run_resuming_load(mesh, workload, concurrency=8, give_up_s=60.0,
                      in_flight: InFlight | None = None, stall_s: float | None = 30.0):
    """Every request once, by a client that survives the front door going away
    (`llmesh.mesh.client.ResumingStream`: a broken stream is sent again with the tokens it
    has and the seed it was told). Per request (status, tokens, last chunk, attempts)."""
    prompts, params, _ = workload
    in_flight = in_flight or InFlight()

    def call(i):
        p = params[i]
        req = workload_request(prompts[i], p)
        stream = ResumingStream(mesh.endpoint, req, give_up_s=give_up_s, stall_s=stall_s)
        last = None
        try:
            for last in stream:
                in_flight.streamed(i)
        except grpc.RpcError as e:
            return e.code(), stream.received, last, stream.attempts
        finally:
            in_flight.ended(i)
        return "ok", stream.received, last, stream.attempts

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(call, range(len(prompts))))


def kill_during(mesh, load, victim: str, at_least: int = 2, ready=lambda: True,
                join_s: float = 150.0, in_flight: InFlight | None = None):
    """Run `load(in_flight)` in a thread and SIGKILL `victim` once `at_least` of its
    requests are streaming (and `ready()` holds); (the load's result, how many requests
    were streaming when the kill landed), once the supervisor has restarted the victim.
    Fails when the kill could not land on work in flight."""
    pids = json.loads((mesh.run_dir / "state.json").read_text())["pids"]
    box, in_flight = [], in_flight or InFlight()
    thread = threading.Thread(target=lambda: box.append(load(in_flight)))
    thread.start()
    hit = in_flight.strike(lambda: os.kill(pids[victim], signal.SIGKILL), at_least, ready)
    thread.join(join_s)
    assert not thread.is_alive(), "the load hung"
    assert hit > 0, f"the load ended before {at_least} of its requests streamed at once"
    assert wait_until(lambda: json.loads((mesh.run_dir / "state.json").read_text())["pids"]
                      [victim] != pids[victim], 30), f"{victim} was not restarted"
    return box[0], hit


def replica_serving(mesh) -> bool:
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


def scheduler_stats(mesh, replica: int = 0):
    """The replica's scheduler's GetStats."""
    port = mesh.config["replica_ports"][replica]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=5)


def metric(mesh, process: str, name: str) -> float:
    """The sum of a Prometheus series over its labels, as `process` exports it."""
    port = mesh.config["observability"]["metrics_ports"][process]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def router_migrations(mesh) -> float:
    """How many requests router-0 has moved to another replica (its metric)."""
    return metric(mesh, "router-0", "llmesh_request_migrations_total")


def assert_all_exact(results, expect):
    for i, ((status, tokens, last), exp) in enumerate(zip(results, expect)):
        assert status == "ok", (i, status)
        assert tokens == exp, f"request {i}: OK with other tokens than a fault-free run"
        assert not last.incomplete
