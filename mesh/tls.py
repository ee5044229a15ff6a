"""TLS at the gateway: the certificate Envoy presents on the public port.

`envoy.tls_cert_file` / `envoy.tls_key_file` name a PEM pair (a certificate a
CA signed, or any other); `envoy.tls_self_signed: true` has `llmesh up` make
one for local use under the run directory (an EC P-256 key and a certificate for
`localhost` and 127.0.0.1, made by the `openssl` command), reused while it is
valid. Either way the listener speaks TLS only, offering HTTP/2 (gRPC) and
HTTP/1.1 (the OpenAI API, curl) by ALPN. Clients trust a self-signed
certificate by pinning it: its SHA-256 fingerprint is printed at start and
kept in the mesh's state, and the certificate file is what `llmesh generate`
and the client library pass as the root.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import subprocess
from pathlib import Path

from llmesh.mesh.config import ConfigError, MeshConfig

SELF_SIGNED_DAYS = 365


def fingerprint(cert_file: str | Path) -> str:
    """SHA-256 of the certificate's DER bytes, as AA:BB:... (what browsers and
    `openssl x509 -fingerprint -sha256` show)."""
    pem = Path(cert_file).read_text()
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    digest = hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for localhost in `directory`: made when missing, else reused."""
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", str(SELF_SIGNED_DAYS), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("envoy.tls_self_signed needs the openssl command; install it, or "
                          "set envoy.tls_cert_file and tls_key_file") from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"openssl could not make a certificate: {e.stderr.strip()}") from None
    key.chmod(0o600)
    return cert, key


def with_certificate(cfg: MeshConfig, run_dir: Path) -> MeshConfig:
    """`cfg` with the gateway's certificate files named (self-signed made here) and
    checked to exist; unchanged without TLS."""
    e = cfg.envoy
    if e.tls_self_signed:
        cert, key = make_self_signed(run_dir / "tls")
        e = dataclasses.replace(e, tls_cert_file=str(cert), tls_key_file=str(key))
    if not e.tls_cert_file:
        return cfg
    for name in ("tls_cert_file", "tls_key_file"):
        if not Path(getattr(e, name)).is_file():
            raise ConfigError(f"envoy.{name}: {getattr(e, name)} is not a file")
    return dataclasses.replace(cfg, envoy=e)


def tls_state(cfg: MeshConfig) -> dict | None:
    """What clients of a running mesh need: the certificate to trust (self-signed:
    the file itself; else None, the system's roots) and its fingerprint."""
    e = cfg.envoy
    if not e.tls_cert_file:
        return None
    return {"ca_file": e.tls_cert_file if e.tls_self_signed else None,
            "fingerprint": fingerprint(e.tls_cert_file)}
