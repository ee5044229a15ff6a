"""A replica that starts answering wrong (an executor started with a test-only flag
that shifts every sampled token after a while) is caught by its known-answer
probe: it ejects itself (NOT_SERVING, and the router stops sending it work)
instead of answering OK with wrong tokens."""
import grpc
import pytest
from grpc_health.v1 import health_pb2

from chaos.load import scheduler_stats
from integration.mesh_fixture import Mesh, health_status, serving, wait_until
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("probe"), observability={"tracing": "off"},
             engine={"num_kv_blocks": 512, "probe_interval_s": 0.5,
                     "test_corrupt_after_steps": 60},
             routing={"replica_wait_s": 1.0})
    yield from serving(m)


def test_a_replica_that_answers_wrong_ejects_itself(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    # the first probes record and confirm the answer; then the executor turns bad
    assert wait_until(lambda: scheduler_stats(mesh).num_probes >= 2, 30)
    assert scheduler_stats(mesh).num_probe_failures == 0
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
                                            sampling=common_pb2.SamplingParams(max_tokens=8))
        for _ in range(10):  # steps go by; the corruption starts after 60 sampling steps
            try:
                stub.Complete(req, timeout=10)
            except grpc.RpcError:
                break
    assert wait_until(lambda: scheduler_stats(mesh).is_ejected, 30), mesh.logs()
    stats = scheduler_stats(mesh)
    assert stats.num_probe_failures >= 1 and stats.num_kv_resets == 0
    assert health_status(port) == health_pb2.HealthCheckResponse.NOT_SERVING
    # the router sends it nothing: with no other replica, a request waits, then fails
    with grpc.insecure_channel(mesh.endpoint) as ch:
        with pytest.raises(grpc.RpcError) as info:
            inference_pb2_grpc.InferenceStub(ch).Complete(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
