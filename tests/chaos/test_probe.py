"""A replica that starts answering wrong (an executor started with a test-only flag
that shifts every sampled token after a while) is caught by its known-answer
probe: it ejects itself (NOT_SERVING, and the router stops sending it work)
instead of answering OK with wrong tokens, restarts its executor, and is
readmitted once a probe passes again."""
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2

from chaos.load import NO_TTFT_BUDGET, scheduler_stats
from integration.mesh_fixture import Mesh, health_status, serving, wait_until
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    m = Mesh(tiny_model_dir, tmp_path_factory.mktemp("probe"),
             admission=NO_TTFT_BUDGET, observability={"tracing": "off"},
             engine={"num_kv_blocks": 512, "probe_interval_s": 1.0,
                     "test_corrupt_after_steps": 60},
             routing={"replica_wait_s": 1.0})
    yield from serving(m)


def _executor_pid(mesh) -> int:
    return json.loads((mesh.run_dir / "state.json").read_text())["pids"]["executor-0-0"]


def test_a_replica_that_answers_wrong_ejects_itself_and_restarts_its_executor(mesh):
    port = mesh.config["replica_ports"][0]["scheduler"]
    pid = _executor_pid(mesh)
    # the first probes record and confirm the answer; then the executor turns bad
    assert wait_until(lambda: scheduler_stats(mesh).num_probes >= 2, 30)
    assert scheduler_stats(mesh).num_probe_failures == 0
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        req = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=[0, 5, 6]),
                                            sampling=common_pb2.SamplingParams(max_tokens=8))
        good = list(stub.Complete(req, timeout=10).token_ids)
        for _ in range(10):  # steps go by; the corruption starts after 60 sampling steps
            try:
                stub.Complete(req, timeout=10)
            except grpc.RpcError:
                break
        assert wait_until(lambda: scheduler_stats(mesh).num_probe_failures >= 1, 30), \
            mesh.logs()
        # ejected (NOT_SERVING) while its executor restarts ...
        assert wait_until(lambda: _executor_pid(mesh) != pid, 30), mesh.logs()
        # ... then readmitted by a passing probe, and right again
        assert wait_until(lambda: not scheduler_stats(mesh).is_ejected
                          and health_status(port) == health_pb2.HealthCheckResponse.SERVING, 30)
        assert list(stub.Complete(req, timeout=10).token_ids) == good
    log = (mesh.run_dir / "logs" / "scheduler-0.log").read_text()
    assert "known-answer probe failed" in log and "ejecting this replica" in log
    assert "restarting the executors of the ejected replica" in log
