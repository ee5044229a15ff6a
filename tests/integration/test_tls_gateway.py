"""TLS at the gateway: a mesh with a self-signed certificate serves the OpenAI API
(HTTP/1.1) and gRPC (HTTP/2) over TLS on its one public port, refuses plaintext,
pins by the fingerprint it reports, works with `llmesh generate`, and a keyed
mesh neither logs the keys nor does any work for a request without one. Behind
the gateway the routers take mutual TLS only (`envoy.upstream_mtls`): Envoy's
every request reached them over it, and nothing without the mesh's client
certificate gets an answer from their ports."""
import json
import shutil
import ssl
import subprocess
import urllib.request

import grpc
import openai
import pytest

from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from mesh_fixture import Mesh, envoy_counters, serving

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="self-signed certificates are made by openssl")
KEY = "k-secret-0123456789"


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    from llmesh.services.router.tenants import hash_key
    run_dir = tmp_path_factory.mktemp("tls")
    keys = run_dir / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {"team": {"keys": [hash_key(KEY)]}}}))
    m = Mesh(tiny_model_dir, run_dir, envoy={"tls_self_signed": True, "upstream_mtls": True},
             observability={"tracing": "off"}, admission={"keys_file": str(keys)})
    yield from serving(m)


def _cert(mesh) -> str:
    return mesh.config["envoy"]["tls_cert_file"]


def test_state_reports_the_certificate_and_its_fingerprint(mesh):
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                          _cert(mesh)], capture_output=True, text=True, check=True).stdout
    assert mesh.state["tls"] == {"ca_file": _cert(mesh),
                                 "fingerprint": out.strip().split("=", 1)[1]}


def test_openai_client_over_https(mesh):
    import httpx2
    client = openai.OpenAI(base_url=f"https://{mesh.endpoint}/v1", api_key=KEY, max_retries=0,
                           timeout=60, http_client=httpx2.Client(verify=ssl.create_default_context(
                               cafile=_cert(mesh))))
    resp = client.chat.completions.create(model="default", max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "hello"}])
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    stream = client.completions.create(model="default", prompt="abc", max_tokens=4,
                                       temperature=0, stream=True)
    assert sum(1 for c in stream if c.choices and c.choices[0].text) >= 1


def test_plaintext_and_unknown_certificates_are_refused(mesh):
    with pytest.raises(OSError):  # (the TLS listener does not answer plain HTTP)
        urllib.request.urlopen(f"http://{mesh.endpoint}/v1/models", timeout=10).read()
    with pytest.raises(OSError):  # a client that does not trust the certificate
        urllib.request.urlopen(f"https://{mesh.endpoint}/v1/models", timeout=10)


def _complete(channel, metadata):
    return inference_pb2_grpc.InferenceStub(channel).Complete(
        inference_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(
            max_tokens=3, temperature=0)), timeout=60, metadata=metadata)


def test_grpc_over_tls_and_keys_stay_secret(mesh):
    creds = grpc.ssl_channel_credentials(open(_cert(mesh), "rb").read())
    with grpc.secure_channel(mesh.endpoint, creds) as ch:
        assert _complete(ch, (("authorization", f"Bearer {KEY}"),)).usage.completion_tokens == 3
        encodes = _tokenizer_requests(mesh)
        with pytest.raises(grpc.RpcError) as info:
            _complete(ch, (("authorization", "Bearer k-wrong"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _tokenizer_requests(mesh) == encodes  # refused before any tokenizer work
    with grpc.insecure_channel(mesh.endpoint) as ch, pytest.raises(grpc.RpcError) as info:
        _complete(ch, (("authorization", f"Bearer {KEY}"),))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    logs = "".join(p.read_text(errors="replace") for p in (mesh.run_dir / "logs").glob("*.log"))
    assert KEY not in logs and "k-wrong" not in logs


def _tokenizer_requests(mesh) -> float:
    port = mesh.config["observability"]["metrics_ports"]["tokenizer-0"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmesh_tokenizer_requests_total"))


def test_llmesh_generate_speaks_tls(mesh):
    proc = mesh.cli("generate", "--prompt", "hello there", "--max-tokens", "4", "--temperature", "0",
                    "--api-key", KEY, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 4
    status = mesh.cli("status")
    assert mesh.state["tls"]["fingerprint"] in status.stdout


def test_routers_take_mutual_tls_only(mesh):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from llmesh.services.common.mtls import MtlsFiles, channel_credentials
    files = MtlsFiles(mesh.run_dir / "tls" / "upstream")
    assert mesh.config["envoy"]["upstream_mtls_dir"] == str(files.directory)
    assert not (files.directory / "ca.key").exists()
    _complete_through_gateway(mesh)
    # every connection Envoy made to the routers' two clusters was a TLS handshake
    stats = _envoy_stats(mesh)
    for cluster in ("routers", "http"):
        assert stats[f"cluster.{cluster}.ssl.handshake"] >= 1, cluster
        assert stats[f"cluster.{cluster}.ssl.connection_error"] == 0, cluster
        assert stats[f"cluster.{cluster}.upstream_cx_total"] <= \
            stats[f"cluster.{cluster}.ssl.handshake"] + stats[f"cluster.{cluster}.upstream_cx_connect_fail"]
    grpc_port, http_port = mesh.config["router_ports"][0], mesh.config["http_ports"][0]
    target = f"127.0.0.1:{grpc_port}"

    def health(channel):
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10).status
    with grpc.secure_channel(target, channel_credentials(files)) as ch:
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING
    strangers = (grpc.insecure_channel(target),  # plaintext
                 grpc.secure_channel(target, grpc.ssl_channel_credentials(  # no client cert
                     files.ca.read_bytes())))
    for ch in strangers:
        with ch, pytest.raises(grpc.RpcError) as info:
            health(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):  # plain HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10).read()
    no_cert = ssl.create_default_context(cafile=str(files.ca))
    with pytest.raises(OSError):  # TLS without the client certificate
        urllib.request.urlopen(f"https://localhost:{http_port}/health", timeout=10,
                               context=no_cert).read()
    with_cert = ssl.create_default_context(cafile=str(files.ca))
    with_cert.load_cert_chain(str(files.client_cert), str(files.client_key))
    with urllib.request.urlopen(f"https://localhost:{http_port}/health", timeout=10,
                                context=with_cert) as r:
        assert r.status == 200
    status = json.loads(mesh.cli("status", "--json").stdout)
    assert status["services"]["router-0"] is True  # the CLI's health check speaks it too


def _complete_through_gateway(mesh):
    creds = grpc.ssl_channel_credentials(open(_cert(mesh), "rb").read())
    with grpc.secure_channel(mesh.endpoint, creds) as ch:
        assert _complete(ch, (("authorization", f"Bearer {KEY}"),)).usage.completion_tokens == 3
    req = urllib.request.Request(f"https://{mesh.endpoint}/v1/models",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30, context=ssl.create_default_context(
            cafile=_cert(mesh))) as r:
        assert r.status == 200


def _envoy_stats(mesh) -> dict[str, int]:
    return envoy_counters(mesh, "^cluster\\.(routers|http)\\.")
