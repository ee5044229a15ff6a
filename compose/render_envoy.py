"""Envoy for the compose mesh: render its bootstrap with the project's own renderer
(mesh/envoy.py), then become Envoy (copied into the image as
/opt/llmesh-compose/render_envoy.py).

    python render_envoy.py [--out /tmp/envoy.yaml] [--print]

The routers are a compose service, so the bootstrap is static (`envoy.xds: false`,
no control plane), with the renderer's clusters, routes, retries, health checks and
tracer, and three changes for containers:
- the routers' clusters (gRPC and HTTP API) find their endpoints by DNS
  (STRICT_DNS on the router service's name: every container of it, so
  `--scale router=N` works; re-resolved every 5 s, Envoy's default);
- the listener binds 0.0.0.0, so that the port the compose file publishes reaches it;
- admin binds 0.0.0.0 too, inside the compose network only (not published), for
  Prometheus to scrape /stats/prometheus.

Settings, from the environment:

    LLMESH_ENVOY_PORT       public listener (8080)
    LLMESH_ENVOY_ADMIN_PORT admin (9901)
    LLMESH_ROUTER_HOST      the routers' DNS name (router)
    LLMESH_ROUTER_PORT      their gRPC port (50055)
    LLMESH_HTTP_PORT        their HTTP API port (8000; 0 = no HTTP API routes)
    LLMESH_TRACING          otlp | off (otlp)
    LLMESH_OTLP_ENDPOINT    host:port of the OTLP/gRPC trace receiver (otlp:4317)
    LLMESH_TRACE_SAMPLE     share of new traces sampled (1.0)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def compose_config():
    from llmesh.mesh.config import parse_config
    tracing = os.environ.get("LLMESH_TRACING", "otlp")
    observability = {"tracing": tracing,
                     "sample_ratio": float(os.environ.get("LLMESH_TRACE_SAMPLE", "1.0"))}
    if tracing == "otlp":
        observability["otlp_endpoint"] = os.environ.get("LLMESH_OTLP_ENDPOINT", "otlp:4317")
    http_port = int(os.environ.get("LLMESH_HTTP_PORT", "8000"))
    return parse_config({
        "routers": 1, "router_ports": [int(os.environ.get("LLMESH_ROUTER_PORT", "50055"))],
        "http_api": bool(http_port), "http_ports": [http_port] if http_port else [],
        "envoy": {"xds": False, "port": int(os.environ.get("LLMESH_ENVOY_PORT", "8080")),
                  "admin_port": int(os.environ.get("LLMESH_ENVOY_ADMIN_PORT", "9901"))},
        "observability": observability})


def render() -> dict:
    from llmesh.mesh.envoy import render_envoy
    bootstrap = render_envoy(compose_config())
    router_host = os.environ.get("LLMESH_ROUTER_HOST", "router")
    resources = bootstrap["static_resources"]
    for cluster in resources["clusters"]:
        if cluster["name"] in ("routers", "http"):
            cluster["type"] = "STRICT_DNS"
            cluster["dns_lookup_family"] = "V4_ONLY"
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["address"] = router_host
    for listener in resources["listeners"]:
        listener["address"]["socket_address"]["address"] = "0.0.0.0"
    bootstrap["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    return bootstrap


def main() -> None:
    import yaml
    p = argparse.ArgumentParser(prog="render_envoy")
    p.add_argument("--out", default="/tmp/envoy.yaml")
    p.add_argument("--print", action="store_true", help="print the bootstrap, do not start Envoy")
    args = p.parse_args()
    text = yaml.safe_dump(render(), sort_keys=False)
    if args.print:
        sys.stdout.write(text)
        return
    Path(args.out).write_text(text)
    from llmesh.mesh.envoy import envoy_binary
    binary = envoy_binary()
    os.execv(binary, [binary, "-c", args.out, "--disable-hot-restart", "--concurrency", "1",
                      "--log-level", os.environ.get("LLMESH_ENVOY_LOG_LEVEL", "warn")])


if __name__ == "__main__":
    main()
