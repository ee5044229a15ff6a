"""Envoy fed by the xDS control plane (mesh/xds.py): routers drained, removed and
added at run time, with no Envoy restart and no stream dropped."""
import json
import re
import threading
import urllib.request

import grpc
import pytest

from integration.mesh_fixture import Mesh, serving, wait_until
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from llmesh.mesh.supervisor import write_routers


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("xds"), routers=2, tokenizers=1,
             observability={"tracing": "off"})
    yield from serving(m)


def _endpoints(mesh) -> dict:
    """Envoy's routers cluster: port -> health flags."""
    port = mesh.config["envoy"]["admin_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/clusters", timeout=5).read().decode()
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^routers::127\.0\.0\.1:(\d+)::health_flags::(\S+)$", text, re.M)}


def _requests_served(mesh, router: str) -> float:
    port = mesh.config["observability"]["metrics_ports"][router]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^llmesh_requests_total\{[^}]*\} (\S+)$", text, re.M))


def _envoy_pid(mesh) -> int:
    return json.loads((mesh.run_dir / "state.json").read_text())["pids"]["envoy"]


def _request(max_tokens: int):
    return inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6, 7]),
                                         sampling=common_pb2.SamplingParams(
                                             max_tokens=max_tokens, ignore_eos=True))


def test_routers_drain_leave_and_join_without_an_envoy_restart(mesh):
    routers, http = mesh.config["router_ports"], mesh.config["http_ports"]
    pid = _envoy_pid(mesh)
    assert _endpoints(mesh) == {routers[0]: "healthy", routers[1]: "healthy"}
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        # long streams through both routers, then router-0 drains under them
        results, started = [], [threading.Event() for _ in range(6)]

        def stream(i):
            tokens = 0
            for chunk in stub.Generate(_request(300), timeout=120):
                started[i].set()
                tokens += len(chunk.token_ids)
            results.append(tokens)
        streams = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for s in streams:
            s.start()
        assert all(e.wait(30) for e in started)
        write_routers(mesh.run_dir, routers, http, draining=[routers[0]])
        assert wait_until(lambda: "eds_status_draining" in _endpoints(mesh)[routers[0]], 10)
        for s in streams:
            s.join(120)
        assert results == [300] * 6  # no stream dropped by the drain
        before = _requests_served(mesh, "router-0")
        for _ in range(12):  # new requests: none to the draining router
            stub.Complete(_request(2), timeout=30)
        assert _requests_served(mesh, "router-0") == before
        # router-0 leaves, then both are back: endpoints change, Envoy stays
        write_routers(mesh.run_dir, routers[1:], http[1:])
        assert wait_until(lambda: list(_endpoints(mesh)) == [routers[1]], 10)
        stub.Complete(_request(2), timeout=30)
        write_routers(mesh.run_dir, routers, http)
        assert wait_until(lambda: _endpoints(mesh) == {routers[0]: "healthy",
                                                       routers[1]: "healthy"}, 15)
        stub.Complete(_request(2), timeout=30)
    assert _envoy_pid(mesh) == pid
