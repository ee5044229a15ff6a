"""The routers' endpoints from the Kubernetes API: the xDS control plane's source in
a cluster (`python -m llmesh.mesh.xds ... --endpointslices NAMESPACE/SERVICE`).

Every `every_s` the control plane lists the EndpointSlices (discovery.k8s.io/v1)
of the routers' Service with the pod's service account (its token and CA under
/var/run/secrets/kubernetes.io/serviceaccount, the API at
https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; both can be given
instead, for tests or from outside a cluster), and turns them into the routers
file's shape (`mesh/xds.py`) with addresses instead of loopback ports:

    {"routers": ["10.1.2.3:50051", ...], "http": ["10.1.2.3:8081", ...],
     "draining": [the gRPC and HTTP addresses of draining routers]}

The Service's ports named `grpc` and `http` give the two clusters. A ready
endpoint serves; a terminating one (its pod is being deleted) or one not ready
stays in its cluster as DRAINING: Envoy sends it no new request and its open
streams run to their end. An endpoint that leaves every slice leaves the cluster.
When the API cannot be read, or answers something that is not an
EndpointSliceList, the error is logged (once, until it changes) and the last
good endpoints stay.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GRPC_PORT_NAME = "grpc"  # the router Service's port names: the gRPC cluster's ...
HTTP_PORT_NAME = "http"  # ... and the HTTP API's
log = logging.getLogger("llmesh.xds")


class KubeApiError(Exception):
    """The API could not be read, or did not answer what was asked."""


@dataclass(frozen=True)
class KubeApi:
    url: str  # https://host:port (http:// for tests)
    token_file: Path | None = None  # read on every request: projected tokens rotate
    ca_file: Path | None = None
    timeout_s: float = 5.0

    @classmethod
    def in_cluster(cls, url: str = "", token_file: str = "", ca_file: str = "") -> "KubeApi":
        """The API as a pod sees it; each argument given replaces what the pod has."""
        if not url:
            host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise KubeApiError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset); "
                                   "give the API's URL (--k8s-api)")
            url = f"https://{_host_port(host, port)}"
        token = Path(token_file) if token_file else SERVICE_ACCOUNT_DIR / "token"
        ca = Path(ca_file) if ca_file else SERVICE_ACCOUNT_DIR / "ca.crt"
        return cls(url.rstrip("/"), token if token_file or token.is_file() else None,
                   ca if ca_file or ca.is_file() else None)

    def get(self, path: str) -> dict:
        """GET `path` as JSON; KubeApiError names the URL and what went wrong."""
        url = self.url + path
        headers = {"Accept": "application/json"}
        try:
            if self.token_file is not None:
                headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
            context = None
            if url.startswith("https:"):
                context = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file else None)
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=self.timeout_s, context=context) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise KubeApiError(f"GET {url}: HTTP {e.code}: {_status_message(e)}") from None
        except (urllib.error.URLError, OSError, ssl.SSLError) as e:
            raise KubeApiError(f"GET {url}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise KubeApiError(f"GET {url}: the answer is not JSON ({body[:80]!r})") from None


def _status_message(e: urllib.error.HTTPError) -> str:
    """The message of the API's Status object, or the reason phrase."""
    try:
        return json.loads(e.read()).get("message") or e.reason
    except (ValueError, AttributeError, OSError):
        return str(e.reason)


def _host_port(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def list_endpoint_slices(api: KubeApi, namespace: str, service: str) -> list[dict]:
    """Every EndpointSlice of `service` (following the list's continue tokens)."""
    selector = urllib.parse.quote(f"kubernetes.io/service-name={service}")
    base = (f"/apis/discovery.k8s.io/v1/namespaces/{urllib.parse.quote(namespace)}"
            f"/endpointslices?labelSelector={selector}&limit=500")
    items: list[dict] = []
    cont = ""
    while True:
        page = api.get(base + (f"&continue={urllib.parse.quote(cont)}" if cont else ""))
        if not isinstance(page, dict) or page.get("kind") != "EndpointSliceList":
            kind = page.get("kind") if isinstance(page, dict) else type(page).__name__
            raise KubeApiError(f"the API answered {kind!r}, not an EndpointSliceList")
        items += page.get("items") or []
        cont = (page.get("metadata") or {}).get("continue") or ""
        if not cont:
            return items


def routers_from_slices(slices: list[dict]) -> dict:
    """The routers file's content for these slices (sorted, so the same endpoints
    always give the same content). An address in several slices (while one is
    rewritten) serves if any of them says it is ready."""
    ready: dict[str, bool] = {}  # gRPC address -> ready
    http_of: dict[str, str] = {}  # gRPC address -> HTTP address
    for s in slices:
        ports = {p.get("name") or "": p["port"] for p in s.get("ports") or [] if p.get("port")}
        if GRPC_PORT_NAME not in ports:
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            # (an unset `ready` means ready, as the API defines it)
            is_ready = cond.get("ready") is not False and not cond.get("terminating")
            for addr in ep.get("addresses") or []:
                key = _host_port(addr, ports[GRPC_PORT_NAME])
                ready[key] = ready.get(key, False) or is_ready
                if HTTP_PORT_NAME in ports:
                    http_of[key] = _host_port(addr, ports[HTTP_PORT_NAME])
    routers = sorted(ready)
    draining = [r for r in routers if not ready[r]]
    return {"routers": routers, "http": sorted(http_of[r] for r in routers if r in http_of),
            "draining": sorted(draining + [http_of[r] for r in draining if r in http_of])}


def parse_target(target: str) -> tuple[str, str]:
    """NAMESPACE/SERVICE, or SERVICE in the pod's own namespace."""
    if "/" in target:
        namespace, service = target.split("/", 1)
    else:
        try:
            namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        except OSError:
            raise KubeApiError(f"{target!r} names no namespace and this is not a pod "
                               "(give NAMESPACE/SERVICE)") from None
        service = target
    if not namespace or not service:
        raise KubeApiError(f"{target!r}: expected NAMESPACE/SERVICE")
    return namespace, service


async def watch_endpoint_slices(plane, api: KubeApi, namespace: str, service: str,
                                every_s: float = 1.0) -> None:
    """Feed `plane` (ControlPlane.set_routers) from the slices, every `every_s`."""
    where = f"EndpointSlices of {namespace}/{service}"
    failing = None  # the last error logged, until the API answers again
    while True:
        try:
            slices = await asyncio.to_thread(list_endpoint_slices, api, namespace, service)
        except KubeApiError as e:
            if str(e) != failing:
                failing = str(e)
                log.error("xds: cannot read the %s: %s; keeping the last endpoints", where, e)
        else:
            if failing is not None:
                log.warning("xds: the %s can be read again", where)
                failing = None
            await plane.set_routers(routers_from_slices(slices))
        await asyncio.sleep(every_s)
