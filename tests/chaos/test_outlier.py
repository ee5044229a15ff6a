"""Envoy's outlier detection, tested rather than only configured: a router that
fails every request while its health check says SERVING (a test-only flag) is
ejected by Envoy after consecutive 5xx, and clients see no failure meanwhile
(a request it fails before answering is retried on the other router)."""
import urllib.request

import grpc
import pytest

from chaos.load import NO_TTFT_BUDGET
from integration.mesh_fixture import Mesh, serving
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("outlier"),
             admission=NO_TTFT_BUDGET, routers=2, tokenizers=1,
             observability={"tracing": "off"}, routing={"test_failing_router": 1})
    yield from serving(m)


def _admin(mesh, path: str) -> str:
    port = mesh.config["envoy"]["admin_port"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


def _stat(mesh, name: str) -> int:
    for line in _admin(mesh, f"/stats?filter=^{name}$").splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":")[1])
    return 0


def _bad_router_flags(mesh) -> str:
    """Envoy's health flags for the failing router's endpoint."""
    port = mesh.config["router_ports"][1]
    for line in _admin(mesh, "/clusters").splitlines():
        if line.startswith(f"routers::127.0.0.1:{port}::health_flags::"):
            return line.rsplit("::", 1)[1]
    raise AssertionError("the failing router is not in Envoy's cluster")


def test_a_router_that_fails_everything_is_ejected_and_clients_see_no_failure(mesh):
    assert _bad_router_flags(mesh) == "healthy"  # its health check passes
    req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6, 7]),
                                        sampling=common_pb2.SamplingParams(max_tokens=4))

    def send(count: int) -> list[str]:
        statuses = []
        with grpc.insecure_channel(mesh.endpoint) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            for _ in range(count):
                try:
                    stub.Complete(req, timeout=30)
                    statuses.append("ok")
                except grpc.RpcError as e:
                    statuses.append(e.code().name)
        return statuses

    assert send(30) == ["ok"] * 30
    assert _stat(mesh, "cluster.routers.outlier_detection.ejections_enforced_total") \
        >= 1, _admin(mesh, "/stats?filter=outlier")
    assert "failed_outlier_check" in _bad_router_flags(mesh)
    # 3 consecutive gateway failures eject it (each one retried on the other router),
    # and while it is ejected nothing goes to it
    retries = _stat(mesh, "cluster.routers.upstream_rq_retry")
    assert retries >= 3
    assert send(20) == ["ok"] * 20
    assert _stat(mesh, "cluster.routers.upstream_rq_retry") == retries
