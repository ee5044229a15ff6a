"""The xDS control plane fed from the Kubernetes API (mesh/k8s_endpoints.py): a real
HTTP server on 127.0.0.1 answers the EndpointSlice list as kube-apiserver does; the
control plane's EDS resources follow it, and a failing API leaves them as they were."""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shutil
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.protobuf import json_format

from llmesh.mesh import k8s_endpoints as k8s
from llmesh.mesh.config import parse_config
from llmesh.mesh.envoy import xds_clusters

TOKEN = "test-token-1"


def endpoint(ip: str, ready=True, terminating=False, serving=None) -> dict:
    cond = {"ready": ready, "serving": ready if serving is None else serving,
            "terminating": terminating}
    return {"addresses": [ip], "conditions": cond, "targetRef": {"kind": "Pod", "name": ip}}


def slice_of(name: str, endpoints: list[dict], ports=(("grpc", 50051), ("http", 8081))) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "llmesh",
                         "labels": {"kubernetes.io/service-name": "llmesh-router"}},
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
            "endpoints": endpoints}


def slice_list(*slices, cont: str = "") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": "7", **({"continue": cont} if cont else {})},
            "items": list(slices)}


class FakeApi:
    """An API server on a free loopback port: answers `self.status` / `self.body` to
    the EndpointSlice list of llmesh/llmesh-router (404 to any other path, 401
    without the token); `pages` (continue token -> list) serves a paged list."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.status, self.body, self.pages = 200, slice_list(), {}
        self.requests: list[tuple[str, str]] = []  # (path, authorization)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                api.requests.append((self.path, self.headers.get("Authorization", "")))
                path, _, query = self.path.partition("?")
                params = dict(p.split("=", 1) for p in query.split("&") if p)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, body = 401, {"kind": "Status", "message": "Unauthorized"}
                elif (path != "/apis/discovery.k8s.io/v1/namespaces/llmesh/endpointslices"
                      or params.get("labelSelector") != "kubernetes.io/service-name%3Dllmesh-router"):
                    status, body = 404, {"kind": "Status", "message": "not found"}
                elif "continue" in params:
                    status, body = 200, api.pages[params["continue"]]
                else:
                    status, body = api.status, api.body
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)


@pytest.fixture
def fake_api():
    api = FakeApi()
    yield api
    api.close()


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def xds_module():
    """llmesh.mesh.xds, whose Envoy messages come from xds-protos' own folder: they leave
    sys.modules afterwards, so that its `envoy` package does not hide the Envoy
    binary's (mesh.envoy.envoy_binary) from the tests that run after these."""
    global xds
    before = set(sys.modules)
    xds = importlib.import_module("llmesh.mesh.xds")
    yield xds
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        where = [getattr(module, "__file__", None) or ""] + list(getattr(module, "__path__", ()))
        if any("xds-protos" in str(w) for w in where):
            del sys.modules[name]


xds = None  # mesh.xds, once the fixture has imported it


def plane():
    # the clusters the gateway's control plane serves: gRPC and the HTTP API
    return xds.ControlPlane(xds_clusters(parse_config({"router_ports": [50051],
                                                       "http_ports": [8081]})))


def eds(p, cluster: str) -> dict[str, str]:
    """address:port -> health status, from the EDS resource the plane serves."""
    (packed,) = p.resources(xds.EDS, [cluster])
    cla = xds.endpoint_pb2.ClusterLoadAssignment()
    packed.Unpack(cla)
    out = {}
    for group in json_format.MessageToDict(cla)["endpoints"]:
        for lb in group.get("lbEndpoints", []):
            sa = lb["endpoint"]["address"]["socketAddress"]
            out[f"{sa['address']}:{sa['portValue']}"] = lb.get("healthStatus", "UNKNOWN")
    return out


async def until(cond, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def run_watching(api: FakeApi, token: Path, body):
    """Run the watcher against `api` while `body(plane, api)` (a coroutine) runs."""
    async def main():
        p = plane()
        kube = k8s.KubeApi(f"http://127.0.0.1:{api.port}", token, timeout_s=2)
        task = asyncio.ensure_future(k8s.watch_endpoint_slices(p, kube, "llmesh",
                                                               "llmesh-router", every_s=0.02))
        try:
            await body(p, api)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(main())


def test_ready_endpoints_serve_terminating_ones_drain_removed_ones_leave(fake_api, token_file):
    fake_api.body = slice_list(
        slice_of("a", [endpoint("10.0.0.1"), endpoint("10.0.0.2"),
                       endpoint("10.0.0.3", ready=False, terminating=True, serving=True)]),
        slice_of("b", [endpoint("10.0.0.4", ready=False)]))

    async def body(p, api):
        await until(lambda: p.version > 1)
        assert eds(p, "routers") == {"10.0.0.1:50051": "UNKNOWN", "10.0.0.2:50051": "UNKNOWN",
                                     "10.0.0.3:50051": "DRAINING", "10.0.0.4:50051": "DRAINING"}
        assert eds(p, "http") == {"10.0.0.1:8081": "UNKNOWN", "10.0.0.2:8081": "UNKNOWN",
                                  "10.0.0.3:8081": "DRAINING", "10.0.0.4:8081": "DRAINING"}
        version = p.version
        await asyncio.sleep(0.2)  # the same slices, polled again: no new version
        assert p.version == version
        # 10.0.0.3's pod is gone, 10.0.0.4 turned ready
        api.body = slice_list(slice_of("a", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]),
                              slice_of("b", [endpoint("10.0.0.4")]))
        await until(lambda: p.version > version)
        assert eds(p, "routers") == {"10.0.0.1:50051": "UNKNOWN", "10.0.0.2:50051": "UNKNOWN",
                                     "10.0.0.4:50051": "UNKNOWN"}
        assert set(eds(p, "http")) == {"10.0.0.1:8081", "10.0.0.2:8081", "10.0.0.4:8081"}
    run_watching(fake_api, token_file, body)
    assert fake_api.requests and all(auth == f"Bearer {TOKEN}" for _, auth in fake_api.requests)


def test_a_failing_api_is_logged_once_and_the_last_endpoints_stay(fake_api, token_file, caplog):
    caplog.set_level(logging.INFO, logger="llmesh.xds")
    fake_api.body = slice_list(slice_of("a", [endpoint("10.0.0.1"), endpoint("10.0.0.2")]))
    good = {"10.0.0.1:50051": "UNKNOWN", "10.0.0.2:50051": "UNKNOWN"}

    def errors():
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    async def body(p, api):
        await until(lambda: eds(p, "routers") == good)
        version = p.version
        api.status, api.body = 500, {"kind": "Status", "message": "etcdserver: request timed out"}
        await until(lambda: errors())
        await asyncio.sleep(0.2)  # several more polls fail the same way: one line
        assert len(errors()) == 1
        assert "HTTP 500: etcdserver: request timed out" in errors()[0]
        assert "keeping the last endpoints" in errors()[0]
        api.status, api.body = 200, {"kind": "Status", "apiVersion": "v1"}
        await until(lambda: len(errors()) == 2)
        assert "'Status', not an EndpointSliceList" in errors()[1]
        api.body = b"<html>proxy error</html>"
        await until(lambda: len(errors()) == 3)
        assert "not JSON" in errors()[2]
        assert (p.version, eds(p, "routers")) == (version, good)
        # it answers again, with one router fewer
        api.body = slice_list(slice_of("a", [endpoint("10.0.0.1")]))
        await until(lambda: p.version > version)
        assert eds(p, "routers") == {"10.0.0.1:50051": "UNKNOWN"}
        assert any("can be read again" in r.getMessage() for r in caplog.records)
        version = p.version
        api.close()  # unreachable now
        await until(lambda: len(errors()) == 4)
        assert f"127.0.0.1:{api.port}" in errors()[3] and "refused" in errors()[3].lower()
        await asyncio.sleep(0.1)
        assert (p.version, eds(p, "routers")) == (version, {"10.0.0.1:50051": "UNKNOWN"})
    run_watching(fake_api, token_file, body)


def test_a_wrong_token_is_an_error_naming_the_status(fake_api, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("nope")
    api = k8s.KubeApi(f"http://127.0.0.1:{fake_api.port}", bad, timeout_s=2)
    with pytest.raises(k8s.KubeApiError, match="HTTP 401: Unauthorized"):
        k8s.list_endpoint_slices(api, "llmesh", "llmesh-router")


def test_a_paged_list_is_read_to_its_end(fake_api, token_file):
    fake_api.body = slice_list(slice_of("a", [endpoint("10.0.0.1")]), cont="page2")
    fake_api.pages = {"page2": slice_list(slice_of("b", [endpoint("10.0.0.2")]))}
    api = k8s.KubeApi(f"http://127.0.0.1:{fake_api.port}", token_file, timeout_s=2)
    slices = k8s.list_endpoint_slices(api, "llmesh", "llmesh-router")
    assert [s["metadata"]["name"] for s in slices] == ["a", "b"]
    assert any("continue=page2" in path for path, _ in fake_api.requests)


def test_slices_map_to_the_routers_file_shape():
    both = slice_of("x", [endpoint("10.0.0.9", ready=False, terminating=True)])
    again = slice_of("y", [endpoint("10.0.0.9")])  # the same pod, ready, in a newer slice
    unset = slice_of("z", [{"addresses": ["10.0.0.7"]}])  # no conditions: ready
    v6 = dict(slice_of("v6", [endpoint("fd00::5")]), addressType="IPv6")
    no_grpc = slice_of("w", [endpoint("10.0.0.8")], ports=(("metrics", 9400),))
    grpc_only = slice_of("g", [endpoint("10.0.0.6", ready=False)], ports=(("grpc", 50051),))
    assert k8s.routers_from_slices([both, again, unset, v6, no_grpc, grpc_only]) == {
        "routers": ["10.0.0.6:50051", "10.0.0.7:50051", "10.0.0.9:50051", "[fd00::5]:50051"],
        "http": ["10.0.0.7:8081", "10.0.0.9:8081", "[fd00::5]:8081"],
        "draining": ["10.0.0.6:50051"]}
    p = plane()
    asyncio.run(p.set_routers(k8s.routers_from_slices([v6])))
    assert eds(p, "routers") == {"fd00::5:50051": "UNKNOWN"}


def test_the_loopback_routers_file_still_pairs_draining_http_ports():
    p = plane()
    asyncio.run(p.set_routers({"routers": [5001, 5002], "http": [6001, 6002], "draining": [5002]}))
    assert eds(p, "routers") == {"127.0.0.1:5001": "UNKNOWN", "127.0.0.1:5002": "DRAINING"}
    assert eds(p, "http") == {"127.0.0.1:6001": "UNKNOWN", "127.0.0.1:6002": "DRAINING"}


def test_in_cluster_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(k8s.KubeApiError, match="KUBERNETES_SERVICE_HOST is unset"):
        k8s.KubeApi.in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    token = tmp_path / "t"
    api = k8s.KubeApi.in_cluster(token_file=str(token))
    assert (api.url, api.token_file) == ("https://[fd00::1]:6443", token)
    assert k8s.parse_target("ns/svc") == ("ns", "svc")
    monkeypatch.setattr(k8s, "SERVICE_ACCOUNT_DIR", tmp_path)
    with pytest.raises(k8s.KubeApiError, match="give NAMESPACE/SERVICE"):
        k8s.parse_target("svc")
    (tmp_path / "namespace").write_text("llmesh\n")
    assert k8s.parse_target("svc") == ("llmesh", "svc")


def test_xds_takes_one_source_or_the_other():
    p = xds.parser()
    args = p.parse_args(["--port", "1", "--clusters", "c.json", "--endpointslices", "ns/svc",
                         "--host", "0.0.0.0", "--poll-s", "2"])
    assert (args.endpointslices, args.routers, args.host, args.poll_s) == ("ns/svc", None,
                                                                           "0.0.0.0", 2.0)
    for argv in (["--routers", "r.json", "--endpointslices", "ns/svc"], []):
        with pytest.raises(SystemExit):
            p.parse_args(["--port", "1", "--clusters", "c.json", *argv])


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
def test_https_with_the_service_account_ca(tmp_path, token_file):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = FakeApi(tls)
    try:
        server.body = slice_list(slice_of("a", [endpoint("10.0.0.1")]))
        url = f"https://127.0.0.1:{server.port}"
        api = k8s.KubeApi.in_cluster(url, str(token_file), str(cert))
        assert len(k8s.list_endpoint_slices(api, "llmesh", "llmesh-router")) == 1
        # the system's CAs do not know this server: refused, with the reason
        with pytest.raises(k8s.KubeApiError, match="CERTIFICATE_VERIFY_FAILED"):
            k8s.list_endpoint_slices(k8s.KubeApi(url, token_file, timeout_s=2),
                                     "llmesh", "llmesh-router")
    finally:
        server.close()


def test_the_control_plane_process_serves_the_slices_over_ads(fake_api, token_file, tmp_path):
    """`python -m llmesh.mesh.xds --endpointslices`: an ADS client gets the slices' routers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from llmesh.mesh.ports import free_port
    fake_api.body = slice_list(slice_of("a", [endpoint("10.0.0.1"),
                                              endpoint("10.0.0.2", terminating=True)]))
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps(xds_clusters(parse_config({"router_ports": [50051],
                                                              "http_ports": [8081]}))))
    port = free_port()
    log = (tmp_path / "xds.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "llmesh.mesh.xds", "--port", str(port),
                             "--clusters", str(clusters), "--endpointslices", "llmesh/llmesh-router",
                             "--k8s-api", f"http://127.0.0.1:{fake_api.port}",
                             "--k8s-token-file", str(token_file), "--poll-s", "0.05"],
                            cwd=Path(__file__).resolve().parents[2],
                            stdout=log, stderr=subprocess.STDOUT)
    done = threading.Event()

    def requests():  # one subscription, the stream kept open until the test is done
        yield xds.discovery_pb2.DiscoveryRequest(type_url=xds.EDS, resource_names=["routers"])
        done.wait(30)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      wait_for_ready=True, timeout=30)
            ads = xds.ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            got = {}
            stream = ads.StreamAggregatedResources(requests(), timeout=30)
            for resp in stream:
                cla = xds.endpoint_pb2.ClusterLoadAssignment()
                resp.resources[0].Unpack(cla)
                got = {lb.endpoint.address.socket_address.address: lb.health_status
                       for group in cla.endpoints for lb in group.lb_endpoints}
                if got:  # (the first version may come before the first read of the API)
                    break
            done.set()
            stream.cancel()
        assert got == {"10.0.0.1": 0, "10.0.0.2": 3}, (tmp_path / "xds.log").read_text()
    finally:
        done.set()
        proc.terminate()
        proc.wait(10)
        log.close()
