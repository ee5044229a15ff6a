"""kill -9 of a router under load, for clients with no resume of their own: a
plain gRPC stub and the official `openai` SDK, through Envoy. The router dies only
once it streams some of the load. Every request whose first byte (gRPC: its
first chunk, which carries the headers; HTTP: the response's headers) the router
had not sent completes with the fault-free answer: Envoy retries it, with a backoff that outlasts the router's
restart when it was the only one, or on the other router. At most the streams the
dead router was serving fail, each with a clear error and never with other
tokens; with two routers the other router's streams complete."""
import threading

import grpc
import httpx2
import openai
import pytest

from chaos.load import (NO_TTFT_BUDGET, InFlight, kill_during, metric, replica_serving,
                        run_load)
from integration.mesh_fixture import Mesh, serving, wait_until

CLEAR_STATUSES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module", params=[1, 2], ids=["one-router", "two-routers"])
def mesh(request, tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp(f"routers{request.param}"),
             admission=NO_TTFT_BUDGET, routers=request.param, http_api=True,
             observability={"tracing": "off"})
    yield from serving(m)


def _router0_streams(mesh, seen: list):
    """`ready` for the kill: router-0 streams at least one request (remembered)."""
    def ready() -> bool:
        try:
            seen.append(metric(mesh, "router-0", "llmesh_requests_in_flight"))
        except OSError:
            return False
        return seen[-1] >= 1
    return ready


def test_plain_grpc_clients_lose_only_the_streams_on_the_dead_router(mesh, workload):
    prompts, _, expect = workload
    on_router0, in_flight = [], InFlight()
    results, hit = kill_during(mesh, lambda t: run_load(mesh, workload, in_flight=t), "router-0",
                               ready=_router0_streams(mesh, on_router0), in_flight=in_flight)
    assert hit > 0
    failed = []
    for i, ((status, tokens, last), exp) in enumerate(zip(results, expect)):
        assert tokens == exp[:len(tokens)], f"request {i}: other tokens than a fault-free run"
        if status == "ok":
            assert tokens == exp and not last.incomplete, i
            continue
        # only a stream the dead router had started may fail, and with a clear status.
        # One with no chunk at all had its headers out when the kill struck before its
        # first message: Envoy then resets it (INTERNAL to the client); a stream Envoy
        # could not send again before any header would be its local UNAVAILABLE
        assert last is not None or status == grpc.StatusCode.INTERNAL, \
            (i, status, "failed before its first byte")
        assert status in CLEAR_STATUSES, (i, status)
        failed.append(i)
    # the kill hit work in flight on router-0 (what it had not answered yet Envoy sent
    # again); at most what it was streaming failed, the other router's went on
    assert on_router0[-1] >= 1
    assert len(failed) <= on_router0[-1], (failed, on_router0[-1])
    assert wait_until(lambda: replica_serving(mesh), 30)


def _sdk_load(mesh, workload, in_flight: InFlight, concurrency: int = 8):
    """Every request of the workload as a streamed completion through the openai SDK
    (token-id prompts, the same seeded parameters); per request ("ok", text, finish
    reason) or ("error", the exception's type, text so far, whether the response's
    headers had come). A request counts as in flight from its headers (when create()
    returns)."""
    prompts, params, _ = workload
    out = [None] * len(prompts)
    next_i = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker():
        client = openai.OpenAI(base_url=f"http://{mesh.endpoint}/v1", api_key="none",
                               max_retries=0, timeout=60)
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            p, text, finish, has_headers = params[i], [], None, False
            try:
                stream = client.completions.create(
                    model="default", prompt=prompts[i], max_tokens=p.max_tokens,
                    temperature=p.temperature, top_p=p.top_p, seed=p.seed, stream=True,
                    extra_body={"ignore_eos": True})
                has_headers = True
                in_flight.streamed(i)
                for chunk in stream:
                    text.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
                out[i] = ("ok", "".join(text), finish)
            except (openai.APIError, httpx2.TransportError) as e:
                out[i] = ("error", type(e).__name__, "".join(text), has_headers)
            finally:
                in_flight.ended(i)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "the load hung"
    return out


def test_openai_sdk_clients_lose_only_the_streams_on_the_dead_router(mesh, workload):
    assert wait_until(lambda: replica_serving(mesh), 30)
    reference = _sdk_load(mesh, workload, InFlight())
    assert all(r[0] == "ok" and r[2] == "length" for r in reference), reference
    on_router0, in_flight = [], InFlight()
    results, hit = kill_during(mesh, lambda t: _sdk_load(mesh, workload, t), "router-0",
                               ready=_router0_streams(mesh, on_router0), in_flight=in_flight)
    assert hit > 0
    failed = []
    for i, (got, (_, text, _)) in enumerate(zip(results, reference)):
        if got[0] == "ok":
            assert got[1:] == (text, "length"), f"request {i}: other text than a fault-free run"
            continue
        assert got[3], (i, got, "failed before its headers")
        assert text.startswith(got[2]), f"request {i}: other text before the error"
        failed.append(i)
    assert on_router0[-1] >= 1  # the kill hit work in flight on router-0
    assert len(failed) <= on_router0[-1], (failed, on_router0[-1])
    assert wait_until(lambda: replica_serving(mesh), 30)
