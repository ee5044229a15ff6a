"""LLMESH_BIND_HOST: where a service's gRPC server and /metrics listen (a
container sets 0.0.0.0). Here another loopback address: the service answers
there, and not on 127.0.0.1."""
import os
import subprocess
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from integration.mesh_fixture import ROOT, wait_until
from llmesh.mesh.ports import free_port


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=1).status == \
                health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_a_service_listens_where_llmesh_bind_host_says(tmp_path):
    port, metrics = free_port(), free_port()
    env = dict(os.environ, LLMESH_BIND_HOST="127.0.0.2", LLMESH_METRICS_PORT=str(metrics),
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "llmesh.services.kvcache", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "kvcache.log", "wb"))
    try:
        assert wait_until(lambda: _serving(f"127.0.0.2:{port}"), 30), \
            (tmp_path / "kvcache.log").read_text()
        assert not _serving(f"127.0.0.1:{port}")
        text = urllib.request.urlopen(f"http://127.0.0.2:{metrics}/metrics", timeout=5).read()
        assert b"process_resident_memory_bytes" in text or b"python_info" in text
    finally:
        proc.kill()
        proc.wait()
