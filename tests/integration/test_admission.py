"""Tenants, limits, deadlines and overload through Envoy on a real mesh.

The mesh runs with a keys file of hashed API keys, two running slots and small
class queues, so the limits are reached with a handful of requests.
"""
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from mesh_fixture import Mesh, serving, wait_until
from llmesh.services.router.tenants import hash_key, new_key

TENANTS = {
    "alice": {"output_tokens_per_window": 40, "quota_window_s": 3600},
    "bob": {"classes": ["standard", "batch"]},
    "carol": {"models": ["some-other-model"]},
    "dave": {"requests_per_minute": 3},
    "erin": {"prefix_cache_group": "shared"},
    "frank": {"prefix_cache_group": "shared"},
    "load": {"max_output_tokens": 2000},
}
KEYS = {name: new_key() for name in TENANTS}


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("admission-mesh")
    keys_file = run_dir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": {
        name: {"keys": [hash_key(KEYS[name])], **spec} for name, spec in TENANTS.items()}}))
    m = Mesh(tiny_model_dir, run_dir, engine={"max_num_seqs": 2},
             observability={"tracing": "off"},
             admission={"keys_file": str(keys_file), "max_output_tokens": 4000,
                        # (a standard request waits for a slot held by a 1,500-token
                        # stream here: on a loaded box the default 15 s TTFT budget
                        # would refuse it as `slo` before its own deadline could pass;
                        # SLO admission has its own tests)
                        "classes": {"batch": {"max_queued_requests": 2},
                                    "standard": {"max_queued_requests": 4,
                                                 "ttft_budget_s": 600.0}}})
    yield from serving(m)


def _auth(tenant):
    return [("authorization", f"Bearer {KEYS[tenant]}")]


def _req(max_tokens, prompt="Tell me a story", **kw):
    return inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True), **kw)


def _stats(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=5)


def _metric(mesh, service, name, **labels):
    port = mesh.config["observability"]["metrics_ports"][service]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def _code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), dict(e.trailing_metadata() or ())
    return grpc.StatusCode.OK, {}


def test_keys_decide_who_may_do_what(mesh, stub):
    assert _code(lambda: stub.Complete(_req(2), timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
    bad = [("authorization", "Bearer " + new_key())]
    assert _code(lambda: stub.Complete(_req(2), metadata=bad, timeout=30))[0] \
        == grpc.StatusCode.UNAUTHENTICATED
    # x-api-key works as well as a bearer token
    out = stub.Complete(_req(2), metadata=[("x-api-key", KEYS["bob"])], timeout=30)
    assert len(out.token_ids) == 2
    # bob may not use the interactive class; carol may not use this model
    assert _code(lambda: stub.Complete(_req(2, priority=common_pb2.PRIORITY_INTERACTIVE),
                                       metadata=_auth("bob"), timeout=30))[0] \
        == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: stub.Complete(_req(2), metadata=_auth("carol"), timeout=30))[0] \
        == grpc.StatusCode.PERMISSION_DENIED
    assert _metric(mesh, "router-0", "llmesh_admission_rejections_total",
                   reason="unauthenticated") >= 2
    # no key appears in any log the services wrote
    logs = "".join(p.read_text() for p in (mesh.run_dir / "logs").glob("*.log"))
    for key in KEYS.values():
        assert key not in logs


def test_output_quota_with_exact_accounting(mesh, stub):
    # 40 output tokens per window: 16 + 16 are admitted, the next 16 would pass it
    used = 0
    for _ in range(2):
        used += stub.Complete(_req(16), metadata=_auth("alice"), timeout=60).usage.completion_tokens
    assert used == 32
    code, trailers = _code(lambda: stub.Complete(_req(16), metadata=_auth("alice"), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(trailers["retry-after-ms"]) > 0
    # the refused request took nothing: 8 more still fit exactly, then nothing does
    assert stub.Complete(_req(8), metadata=_auth("alice"), timeout=60).usage.completion_tokens == 8
    assert _code(lambda: stub.Complete(_req(1), metadata=_auth("alice"), timeout=30))[0] \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _metric(mesh, "router-0", "llmesh_tenant_tokens_total", tenant="alice",
                   kind="output") == 40
    assert _metric(mesh, "router-0", "llmesh_admission_rejections_total",
                   reason="quota_output_tokens") == 2


def test_request_rate_limit_pushes_back(mesh, stub):
    for _ in range(3):
        stub.Complete(_req(1), metadata=_auth("dave"), timeout=30)
    t0 = time.monotonic()
    code, trailers = _code(lambda: stub.Complete(_req(1), metadata=_auth("dave"), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 5  # answered, not queued
    # 3 per minute: the next request is about 20 s away
    assert 10_000 <= float(trailers["grpc-retry-pushback-ms"]) <= 21_000


def test_prefix_cache_is_shared_only_within_a_tenant_or_group(mesh, stub):
    prompt = "The same long system prompt, shared by many requests of one tenant. " * 3
    cached = {}
    for tenant in ("erin", "frank", "bob", "bob"):
        out = stub.Complete(_req(1, prompt=prompt), metadata=_auth(tenant), timeout=30)
        cached.setdefault(tenant, []).append(out.usage.cached_prompt_tokens)
    assert cached["erin"] == [0]
    assert cached["frank"][0] > 0  # same group as erin
    assert cached["bob"][0] == 0 and cached["bob"][1] > 0  # its own, then its own cache


def _stream(stub, req, tenant, into):
    """Run a stream in the background, keeping its chunks and final status."""
    call = stub.Generate(req, metadata=_auth(tenant), timeout=120)

    def run():
        try:
            for chunk in call:
                into.append(chunk)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()
    return call, run


def test_full_queue_and_queued_deadline(mesh, stub):
    pool = ThreadPoolExecutor(8)
    calls, futures = [], []
    try:
        for _ in range(2):  # both running slots taken
            chunks = []
            call, run = _stream(stub, _req(1500), "load", chunks)
            calls.append(call)
            futures.append(pool.submit(run))
        assert wait_until(lambda: _stats(mesh).num_running == 2, 30)
        for _ in range(2):  # the batch queue's two places
            call, run = _stream(stub, _req(4, priority=common_pb2.PRIORITY_BATCH), "load", [])
            calls.append(call)
            futures.append(pool.submit(run))
        assert wait_until(lambda: _stats(mesh).waiting_by_class["batch"] == 2, 30)
        t0 = time.monotonic()
        code, trailers = _code(lambda: stub.Complete(_req(4, priority=common_pb2.PRIORITY_BATCH),
                                                     metadata=_auth("load"), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 5 and int(trailers["retry-after-ms"]) > 0
        # once the scheduler's load report (every 100 ms) says its batch queue is full,
        # the router refuses the next one itself: the scheduler never sees it
        time.sleep(0.5)
        at_router = _metric(mesh, "router-0", "llmesh_admission_rejections_total",
                            reason="queue_full")
        at_scheduler = _metric(mesh, "scheduler-0", "llmesh_scheduler_rejections_total")
        code, trailers = _code(lambda: stub.Complete(_req(4, priority=common_pb2.PRIORITY_BATCH),
                                                     metadata=_auth("load"), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and int(trailers["retry-after-ms"]) > 0
        assert _metric(mesh, "router-0", "llmesh_admission_rejections_total",
                       reason="queue_full") == at_router + 1
        assert _metric(mesh, "scheduler-0", "llmesh_scheduler_rejections_total") == at_scheduler
        # other classes still queue; a standard request whose deadline passes in the queue
        # leaves it with DEADLINE_EXCEEDED and is never computed
        expired = _stats(mesh).num_deadline_expired
        code, _ = _code(lambda: stub.Complete(_req(4, timeout_ms=300), metadata=_auth("load"),
                                              timeout=30))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _stats(mesh).num_deadline_expired == expired + 1
        # refused by the scheduler, or (once its load report said its batch queue is
        # full) by the router before any scheduler work
        assert _metric(mesh, "scheduler-0", "llmesh_scheduler_rejections_total") + _metric(
            mesh, "router-0", "llmesh_admission_rejections_total", reason="queue_full") >= 1
    finally:
        for call in calls:
            call.cancel()
        pool.shutdown(wait=True)
    assert wait_until(lambda: _stats(mesh).num_used_blocks == 0, 10)


def test_deadline_mid_generation_returns_partial_output_marked_incomplete(mesh, stub):
    assert wait_until(lambda: _stats(mesh).num_running == 0, 30)
    out = stub.Complete(_req(1500, timeout_ms=800), metadata=_auth("load"), timeout=60)
    assert out.incomplete and out.incomplete_reason == "deadline exceeded"
    assert out.finish_reason == common_pb2.FINISH_REASON_DEADLINE
    assert 0 < len(out.token_ids) < 1500 and out.usage.completion_tokens == len(out.token_ids)
    assert out.text
    # a stream says so in its last chunk, then ends with DEADLINE_EXCEEDED
    chunks = []
    _, run = _stream(stub, _req(1500, timeout_ms=800), "load", chunks)
    assert run() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chunks[-1].incomplete and sum(len(c.token_ids) for c in chunks) > 0
    assert wait_until(lambda: _stats(mesh).num_used_blocks == 0, 10)


def _rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_overload_at_ten_times_capacity(mesh, stub):
    """Two running slots and a queue of four standard requests; 24 clients keep 24
    requests in flight (bounded: 3 waves of 48). Each one completes or is refused
    at once; nothing hangs; memory stays flat; KV returns to 0."""
    assert wait_until(lambda: _stats(mesh).num_running == 0, 30)

    def one(i):
        t0 = time.monotonic()
        first = None
        try:
            n = 0
            for chunk in stub.Generate(_req(12, prompt=f"Request {i}"), metadata=_auth("load"),
                                       timeout=60):
                first = first or time.monotonic() - t0
                n += len(chunk.token_ids)
            return "ok", n, first, time.monotonic() - t0
        except grpc.RpcError as e:
            return e.code().name, 0, None, time.monotonic() - t0

    pids = mesh.state["pids"]
    watched = {name: pids[name] for name in ("router-0", "scheduler-0")}
    rss = []
    with ThreadPoolExecutor(24) as pool:
        for wave in range(3):
            results = list(pool.map(one, range(wave * 48, (wave + 1) * 48)))
            rss.append({n: _rss_kib(p) for n, p in watched.items()})
            kinds = {r[0] for r in results}
            assert kinds <= {"ok", "RESOURCE_EXHAUSTED"}, kinds
            ok = [r for r in results if r[0] == "ok"]
            refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
            assert ok and refused
            assert all(r[1] == 12 for r in ok)
            # refusals are answered without waiting for capacity
            assert max(r[3] for r in refused) < 5.0
            # admitted requests wait for at most a short queue
            assert max(r[2] for r in ok) < 30.0
    # memory: after the first wave warmed everything up, no growth to speak of
    for name in watched:
        assert rss[2][name] - rss[1][name] < 30 * 1024, (name, rss)
    assert wait_until(lambda: _stats(mesh).num_used_blocks == 0 and _stats(mesh).num_running == 0
                      and _stats(mesh).num_waiting == 0, 10)
    assert _metric(mesh, "router-0", "llmesh_admission_rejections_total", reason="queue_full") > 0


def test_two_routers_sharing_redis_enforce_one_quota(tiny_model_dir, tmp_path_factory):
    from redis_server import start_redis_or_skip
    redis = start_redis_or_skip()
    run_dir = tmp_path_factory.mktemp("redis-mesh")
    key = new_key()
    keys_file = run_dir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": {"shared": {
        "keys": [hash_key(key)], "output_tokens_per_window": 30, "requests_per_minute": 100}}}))
    m = Mesh(tiny_model_dir, run_dir, routers=2, observability={"tracing": "off"},
             admission={"keys_file": str(keys_file), "state": "redis", "redis_url": redis.url})
    try:
        m.up()
        stubs = [inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{p}"))
                 for p in m.config["router_ports"]]
        outcomes = []
        for i in range(8):  # alternate routers: 8 x 6 tokens against a quota of 30
            try:
                out = stubs[i % 2].Complete(_req(6), metadata=[("x-api-key", key)], timeout=60)
                outcomes.append(("ok", i % 2, out.usage.completion_tokens))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, i % 2, 0))
        admitted = [o for o in outcomes if o[0] == "ok"]
        assert sum(o[2] for o in admitted) == 30, outcomes
        assert {o[1] for o in admitted} == {0, 1}  # both routers admitted some
        assert all(o[0] == "RESOURCE_EXHAUSTED" for o in outcomes if o[0] != "ok"), outcomes
    finally:
        m.down()
        redis.stop()
