"""Container health checks of the compose mesh (copied into the image as
/opt/llmesh-compose/healthcheck.py):

    python healthcheck.py grpc PORT        a grpc.health.v1 Check on 127.0.0.1:PORT says SERVING
    python healthcheck.py envoy ADMIN_PORT Envoy's admin /clusters shows a healthy endpoint
                                           in each of its router clusters (gRPC, and the
                                           HTTP API's when there is one)

Exit status 0 when healthy, 1 when not (with the reason on stderr). It runs inside
the service's container, on loopback.
"""
from __future__ import annotations

import sys
import urllib.request


def grpc_serving(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as e:
        return f"health check on port {port} failed: {e.code().name}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return f"port {port} is {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
    return ""


def envoy_serving(admin_port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2) as r:
            lines = r.read().decode().splitlines()
    except OSError as e:
        return f"Envoy admin on port {admin_port}: {e}"
    clusters = ["routers"] + (["http"] if any(x.startswith("http::") for x in lines) else [])
    for cluster in clusters:
        if not any(line.startswith(f"{cluster}::") and line.endswith("health_flags::healthy")
                   for line in lines):
            return f"Envoy sees no healthy endpoint in cluster {cluster!r}"
    return ""


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "envoy") or not argv[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    check = grpc_serving if argv[0] == "grpc" else envoy_serving
    problem = check(int(argv[1]))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
