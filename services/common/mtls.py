"""Mutual TLS between the gateway and the routers: the files and the credentials.

With `envoy.upstream_mtls`, `llmesh up` makes a private CA for the mesh and
issues two certificates from it (mesh/tls.py): the routers' (server auth, for
`localhost` and 127.0.0.1) and the gateway's (client auth). The routers then
serve gRPC and HTTP over TLS only and accept a connection only from a client
that shows a certificate of that CA: Envoy, and the supervisor's own health
checks. The CA's key is deleted once both are issued, so nothing on the
machine can issue another. One directory holds the files; this module names
them and turns them into credentials for each side.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

# the name in the routers' certificate, which clients check (SNI and SAN)
SERVER_NAME = "localhost"


@dataclass(frozen=True)
class MtlsFiles:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "router.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "router.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "gateway.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "gateway.key"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.ca, self.server_cert, self.server_key,
                                         self.client_cert, self.client_key))


def server_credentials(files: MtlsFiles) -> grpc.ServerCredentials:
    """A gRPC server that speaks TLS only and requires a client certificate of the CA."""
    return grpc.ssl_server_credentials(
        [(files.server_key.read_bytes(), files.server_cert.read_bytes())],
        root_certificates=files.ca.read_bytes(), require_client_auth=True)


def channel_credentials(files: MtlsFiles) -> grpc.ChannelCredentials:
    """A gRPC client that trusts only the CA and shows the gateway's certificate."""
    return grpc.ssl_channel_credentials(files.ca.read_bytes(), files.client_key.read_bytes(),
                                        files.client_cert.read_bytes())


def uvicorn_ssl(files: MtlsFiles) -> dict:
    """uvicorn.Config's TLS arguments for the same rule on the HTTP port."""
    return {"ssl_certfile": str(files.server_cert), "ssl_keyfile": str(files.server_key),
            "ssl_ca_certs": str(files.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
