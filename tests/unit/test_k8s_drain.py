"""The pods' preStop drain (mesh/k8s_drain.py): it waits for the router's own
requests-in-flight gauge, served by prometheus_client as the router serves it, and
for a real Envoy's active requests, after draining its listeners."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import yaml
from prometheus_client import make_wsgi_app

from llmesh.mesh import k8s_drain
from llmesh.mesh.ports import free_port
from llmesh.observability.metrics import router_metrics


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def router_metrics_server():
    """The router's metrics (the process's default registry) on a free loopback port."""
    server = make_server("127.0.0.1", 0, make_wsgi_app(), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_router_waits_for_its_requests_in_flight(router_metrics_server):
    gauge = router_metrics().in_flight
    gauge.inc(2)
    try:
        assert k8s_drain.router_in_flight(router_metrics_server) == 2
        # still streaming at the deadline: gives up then
        start = time.monotonic()
        assert k8s_drain.drain("router", router_metrics_server, 0, 0.3, every_s=0.05) == "timeout"
        assert 0.3 <= time.monotonic() - start < 2
        # the streams end a little later: it returns then, not at the deadline
        threading.Timer(0.3, gauge.dec, [2]).start()
        start = time.monotonic()
        assert k8s_drain.drain("router", router_metrics_server, 0, 10, every_s=0.05) == "idle"
        assert 0.3 <= time.monotonic() - start < 3
    finally:
        gauge.set(0)


def test_settle_time_comes_first_and_counts_against_the_limit(router_metrics_server):
    start = time.monotonic()
    assert k8s_drain.drain("router", router_metrics_server, 0.3, 5, every_s=0.05) == "idle"
    assert 0.3 <= time.monotonic() - start < 2


def test_nothing_to_read_ends_the_wait(capsys):
    start = time.monotonic()
    assert k8s_drain.drain("router", f"127.0.0.1:{free_port()}", 0, 30) == "unreadable"
    assert time.monotonic() - start < 5
    assert "not waiting" in capsys.readouterr().err


def _envoy_config(admin: int, listener: int, upstream: int) -> dict:
    """A listener with the gateway's stat prefix, proxying to `upstream`."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "llmesh",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "0s"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}

    def address(port):
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {"admin": {"address": address(admin)}, "static_resources": {
        "listeners": [{"name": "public", "address": address(listener), "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}]}],
        "clusters": [{"name": "up", "type": "STATIC", "connect_timeout": "1s",
                      "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [
                          {"endpoint": {"address": address(upstream)}}]}]}}]}}


def test_envoy_drains_its_listeners_and_waits_for_active_requests(tmp_path):
    from llmesh.mesh.envoy import envoy_binary
    binary = envoy_binary()
    upstream = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    admin, listener = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(_envoy_config(admin, listener, upstream.getsockname()[1])))
    envoy = subprocess.Popen([binary, "-c", str(config), "--disable-hot-restart",
                              "--concurrency", "1", "--log-level", "error", "--drain-time-s", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        address = f"127.0.0.1:{admin}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if k8s_drain.envoy_active(address) == 0:
                    break
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, "Envoy did not start"
            time.sleep(0.1)
        client = socket.create_connection(("127.0.0.1", listener))
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        waited = time.monotonic() + 10
        while k8s_drain.envoy_active(address) != 1:
            assert time.monotonic() < waited
            time.sleep(0.05)
        assert k8s_drain.drain("envoy", address, 0, 0.5, every_s=0.05) == "timeout"
        # the listener was drained: once Envoy's drain time (1 s) has passed it takes
        # no new connection, while the open request goes on
        time.sleep(1.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", listener), timeout=2).close()
        assert k8s_drain.envoy_active(address) == 1
        client.close()  # the request ends
        client = None
        assert k8s_drain.drain("envoy", address, 0, 10, every_s=0.05) == "idle"
    finally:
        if client is not None:
            client.close()
        upstream.close()
        envoy.terminate()
        envoy.wait(10)


def test_command_line():
    args = k8s_drain.parser().parse_args(["router", "--metrics", "127.0.0.1:9400", "--max-s", "110"])
    assert (args.kind, args.metrics, args.settle_s, args.max_s) == ("router", "127.0.0.1:9400",
                                                                   5.0, 110.0)
    with pytest.raises(SystemExit):
        k8s_drain.parser().parse_args(["scheduler"])
