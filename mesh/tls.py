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

`envoy.upstream_mtls: true` has `llmesh up` make the mesh's private CA and its
two certificates (services/common/mtls.py), reused while the files are there:
Envoy and the routers then speak TLS to each other and each checks the other's
certificate.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import subprocess
from pathlib import Path

from llmesh.mesh.config import ConfigError, MeshConfig
from llmesh.services.common.mtls import SERVER_NAME, MtlsFiles

SELF_SIGNED_DAYS = 365


def fingerprint(cert_file: str | Path) -> str:
    """SHA-256 of the certificate's DER bytes, as AA:BB:... (what browsers and
    `openssl x509 -fingerprint -sha256` show)."""
    pem = Path(cert_file).read_text()
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    digest = hashlib.sha256(base64.b64decode("".join(body.split()))).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", str(SELF_SIGNED_DAYS)]
_LOCAL_NAMES = f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1"


def _openssl(args: list[str], needed_by: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(f"{needed_by} needs the openssl command; install it") from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"openssl could not make a certificate: {e.stderr.strip()}") from None


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for localhost in `directory`: made when missing, else reused."""
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(["req", "-x509", *_NEW_KEY, "-subj", "/CN=localhost", "-addext", _LOCAL_NAMES,
              "-keyout", str(key), "-out", str(cert)],
             "envoy.tls_self_signed (or set envoy.tls_cert_file and tls_key_file)")
    key.chmod(0o600)
    return cert, key


def make_upstream_pki(directory: Path) -> MtlsFiles:
    """The mesh's private CA and the certificates it issues, in `directory`: the
    routers' (server auth, localhost and 127.0.0.1) and the gateway's (client
    auth). Made when any file is missing, else reused; the CA's key is deleted
    once both are issued."""
    files = MtlsFiles(directory)
    if files.complete():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key = directory / "ca.key"
    needed_by = "envoy.upstream_mtls"
    try:
        _openssl(["req", "-x509", *_NEW_KEY, "-subj", "/CN=llmesh mesh CA",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-keyout", str(ca_key), "-out", str(files.ca)], needed_by)
        for cert, key, subject, extensions in (
                (files.server_cert, files.server_key, "/CN=llmesh router",
                 [_LOCAL_NAMES, "extendedKeyUsage=serverAuth"]),
                (files.client_cert, files.client_key, "/CN=llmesh gateway",
                 ["extendedKeyUsage=clientAuth"])):
            _openssl(["req", "-x509", *_NEW_KEY, "-subj", subject,
                      "-CA", str(files.ca), "-CAkey", str(ca_key),
                      *[a for ext in ["basicConstraints=critical,CA:FALSE", *extensions]
                        for a in ("-addext", ext)],
                      "-keyout", str(key), "-out", str(cert)], needed_by)
            key.chmod(0o600)
    finally:
        ca_key.unlink(missing_ok=True)
    return files


def with_certificate(cfg: MeshConfig, run_dir: Path) -> MeshConfig:
    """`cfg` with the gateway's certificate files named (self-signed made here) and
    checked to exist, and the upstream CA's directory (made here); unchanged
    without TLS."""
    e = cfg.envoy
    if e.upstream_mtls:
        e = dataclasses.replace(e, upstream_mtls_dir=str(
            make_upstream_pki(run_dir / "tls" / "upstream").directory))
    if e.tls_self_signed:
        cert, key = make_self_signed(run_dir / "tls")
        e = dataclasses.replace(e, tls_cert_file=str(cert), tls_key_file=str(key))
    if not e.tls_cert_file:
        return dataclasses.replace(cfg, envoy=e)
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
