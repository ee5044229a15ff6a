"""preStop hooks for Kubernetes pods (deploy/kubernetes): hold a pod's SIGTERM back
until the requests it streams have finished, so deleting the pod cuts none.

    python -m llmesh.mesh.k8s_drain router --metrics 127.0.0.1:9400 [--settle-s 5] [--max-s 120]
    python -m llmesh.mesh.k8s_drain envoy --admin 127.0.0.1:9901 [--settle-s 5] [--max-s 120]

Kubernetes runs the hook when the pod starts terminating, and sends SIGTERM when it
returns. First `settle_s` pass: the pod's endpoint turns terminating and the
gateway's control plane (mesh/xds.py + mesh/k8s_endpoints.py) marks the router
DRAINING, or kube-proxy stops sending the gateway new connections. Then:

- router: wait until its `llmesh_requests_in_flight` gauge (the router's own
  /metrics, on loopback) reads 0;
- envoy: ask the admin API to drain the listeners gracefully (clients are told
  to go elsewhere: HTTP/2 GOAWAY, `connection: close`), then wait until its
  `http.llmesh.downstream_rq_active` reads 0.

At most `max_s` in all; the pod's terminationGracePeriodSeconds must exceed it.
A value that cannot be read ends the wait (the process is gone or broken: nothing
to wait for), with a line on stderr.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.parse
import urllib.request

ROUTER_GAUGE = "llmesh_requests_in_flight"
ENVOY_ACTIVE = "http.llmesh.downstream_rq_active"  # the listener's stat_prefix (mesh/envoy.py)


def _get(url: str, method: str = "GET") -> str:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
        return r.read().decode()


def router_in_flight(metrics: str) -> float:
    """The gauge's value in a Prometheus text exposition."""
    text = _get(f"http://{metrics}/metrics")
    m = re.search(rf"^{ROUTER_GAUGE}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    if m is None:
        raise ValueError(f"no {ROUTER_GAUGE} on http://{metrics}/metrics")
    return float(m.group(1))


def envoy_active(admin: str) -> float:
    text = _get(f"http://{admin}/stats?filter="
                + urllib.parse.quote(f"^{re.escape(ENVOY_ACTIVE)}$"))
    m = re.search(rf"^{re.escape(ENVOY_ACTIVE)}: (\d+)$", text, re.M)
    if m is None:
        raise ValueError(f"no {ENVOY_ACTIVE} on http://{admin}/stats")
    return float(m.group(1))


def wait_idle(read, max_s: float, every_s: float = 0.5, sleep=time.sleep,
              clock=time.monotonic) -> str:
    """Poll `read()` until it is 0 or `max_s` pass: "idle", "timeout" or "unreadable"."""
    deadline = clock() + max_s
    while True:
        try:
            if read() <= 0:
                return "idle"
        except (OSError, ValueError) as e:
            print(f"k8s_drain: {e}; not waiting", file=sys.stderr)
            return "unreadable"
        if clock() >= deadline:
            return "timeout"
        sleep(min(every_s, max(0.0, deadline - clock())))


def drain(kind: str, address: str, settle_s: float, max_s: float, every_s: float = 0.5) -> str:
    start = time.monotonic()
    time.sleep(settle_s)
    left = max(0.0, max_s - (time.monotonic() - start))
    if kind == "router":
        outcome = wait_idle(lambda: router_in_flight(address), left, every_s)
    else:
        try:
            _get(f"http://{address}/drain_listeners?graceful", method="POST")
        except OSError as e:
            print(f"k8s_drain: cannot drain Envoy's listeners: {e}", file=sys.stderr)
        outcome = wait_idle(lambda: envoy_active(address), left, every_s)
    print(f"k8s_drain: {kind} {outcome} after {time.monotonic() - start:.1f}s", file=sys.stderr)
    return outcome


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmesh.mesh.k8s_drain")
    sub = p.add_subparsers(dest="kind", required=True)
    router = sub.add_parser("router", help="wait for the router's requests in flight")
    router.add_argument("--metrics", default="127.0.0.1:9400", help="its /metrics host:port")
    envoy = sub.add_parser("envoy", help="drain Envoy's listeners, wait for active requests")
    envoy.add_argument("--admin", default="127.0.0.1:9901", help="the admin API's host:port")
    for s in (router, envoy):
        s.add_argument("--settle-s", type=float, default=5.0,
                       help="first wait this long: new requests stop reaching the pod")
        s.add_argument("--max-s", type=float, default=120.0, help="wait at most this long in all")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    drain(args.kind, args.metrics if args.kind == "router" else args.admin, args.settle_s,
          args.max_s)
    return 0  # a failed hook would only delay SIGTERM to the end of the grace period


if __name__ == "__main__":
    sys.exit(main())
