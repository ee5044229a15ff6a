"""A small xDS control plane: Envoy takes its clusters (CDS) and their endpoints
(EDS) over one ADS stream from here, so routers can be added or drained with no
Envoy restart.

    python -m llmesh.mesh.xds --port P --clusters CLUSTERS.json --routers FILE
    python -m llmesh.mesh.xds --port P --clusters CLUSTERS.json --endpointslices NAMESPACE/SERVICE

FILE (JSON, rewritten by the supervisor or `llmesh scale`) lists the routers:
`{"routers": [gRPC port, ...], "http": [HTTP port, ...], "draining": [gRPC port, ...]}`.
The control plane reads it every 0.2 s; a change is a new version of the
endpoints, pushed on every open stream. A draining router stays in its cluster
marked DRAINING: Envoy sends it no new request and its open streams run to
their end. In Kubernetes the same content comes from the routers' Service's
EndpointSlices instead (`mesh/k8s_endpoints.py`), with "host:port" addresses in
place of loopback ports, the draining HTTP addresses listed with the gRPC ones.

The protocol is state-of-the-world ADS (envoy.service.discovery.v3): each
response carries every resource of its type; Envoy answers each with an ACK
(the version and nonce) or a NACK (the previous version and an error_detail,
which is logged). The cluster definitions are those of the static bootstrap
(`mesh/envoy.py`), with their endpoints taken out and served as EDS.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
from pathlib import Path

from llmesh.observability import telemetry  # noqa: F401 (first: its opentelemetry is the venv's)
from llmesh.services.common.server import Service

# The Envoy API messages (xds-protos) live in a folder of their own (see the
# Makefile): the package also carries copies of opentelemetry-proto and of
# googleapis-common-protos, which must not replace the services' own. This
# process, the control plane, takes only the `envoy` messages from there.
_XDS_PROTOS = str(Path(sys.prefix) / "xds-protos")
sys.path.insert(0, _XDS_PROTOS)
try:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    # the typed configs the cluster definitions name must be in the descriptor pool
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401 (mTLS)
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
finally:
    sys.path.remove(_XDS_PROTOS)
from google.protobuf import any_pb2, json_format  # noqa: E402

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
log = logging.getLogger("llmesh.xds")


def socket_address(endpoint: int | str) -> dict:
    """A loopback port (the routers file), or "host:port" / "[v6]:port" (Kubernetes)."""
    if isinstance(endpoint, int):
        return {"address": "127.0.0.1", "port_value": endpoint}
    host, port = endpoint.rsplit(":", 1)
    return {"address": host.strip("[]"), "port_value": int(port)}


def load_assignment(cluster: str, endpoints: list, draining: set = frozenset()) -> dict:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": socket_address(e)}},
         **({"health_status": "DRAINING"} if e in draining else {})} for e in endpoints]}]}


class ControlPlane:
    """The resources served, by type; each change bumps the version and wakes every
    stream."""

    def __init__(self, clusters: list[dict]):
        self.clusters = {c["name"]: c for c in clusters}
        self.endpoints: dict[str, dict] = {name: load_assignment(name, []) for name in self.clusters}
        self.version = 1
        self.changed = asyncio.Condition()

    async def set_routers(self, routers: dict) -> None:
        """`routers`: the routers file's content."""
        draining = set(routers.get("draining", ()))
        new = {"routers": load_assignment("routers", routers.get("routers", []), draining)}
        if "http" in self.clusters:
            # a draining loopback router's HTTP port is its pair's; addresses are listed
            http = routers.get("http", [])
            http_draining = {h for r, h in zip(routers.get("routers", []), http)
                             if isinstance(r, int) and r in draining}
            http_draining |= draining & set(http)
            new["http"] = load_assignment("http", http, http_draining)
        if all(self.endpoints.get(k) == v for k, v in new.items()):
            return
        self.endpoints.update(new)
        async with self.changed:
            self.version += 1
            log.info("xds: version %d: %s", self.version, json.dumps(routers))
            self.changed.notify_all()

    def resources(self, type_url: str, names: list[str]) -> list[any_pb2.Any]:
        if type_url == CDS:
            items = [json_format.ParseDict(c, cluster_pb2.Cluster())
                     for c in self.clusters.values()]
        elif type_url == EDS:
            items = [json_format.ParseDict(self.endpoints[n], endpoint_pb2.ClusterLoadAssignment())
                     for n in (names or self.endpoints) if n in self.endpoints]
        else:
            return []
        out = []
        for item in items:
            packed = any_pb2.Any()
            packed.Pack(item)
            out.append(packed)
        return out


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, plane: ControlPlane):
        self.plane = plane
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(self, request_iterator, context):
        requests: asyncio.Queue = asyncio.Queue()
        subscribed: dict[str, list[str]] = {}  # type -> resource names (EDS: clusters)
        sent: dict[str, int] = {}  # type -> version last sent

        async def read():
            async for req in request_iterator:
                await requests.put(req)
            await requests.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                req = await self._next(requests, sent)
                if req is None:
                    return
                if isinstance(req, discovery_pb2.DiscoveryRequest):
                    if req.HasField("error_detail"):
                        log.error("xds: Envoy rejected %s version %s: %s", req.type_url,
                                  req.version_info, req.error_detail.message)
                    names = list(req.resource_names)
                    if req.type_url not in subscribed or subscribed[req.type_url] != names:
                        subscribed[req.type_url] = names
                        sent.pop(req.type_url, None)  # a new subscription: send it now
                for type_url, names in subscribed.items():
                    if sent.get(type_url) != self.plane.version:
                        sent[type_url] = self.plane.version
                        yield discovery_pb2.DiscoveryResponse(
                            version_info=str(self.plane.version), type_url=type_url,
                            resources=self.plane.resources(type_url, names),
                            nonce=str(next(self._nonces)))
        finally:
            reader.cancel()

    async def _next(self, requests: asyncio.Queue, sent: dict[str, int]):
        """The next request, or "changed" when the resources moved past what was sent."""
        if not requests.empty():
            return requests.get_nowait()
        get = asyncio.ensure_future(requests.get())

        async def changed():
            async with self.plane.changed:
                await self.plane.changed.wait_for(
                    lambda: any(v != self.plane.version for v in sent.values()))
        wait = asyncio.ensure_future(changed())
        done, _ = await asyncio.wait({get, wait}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            wait.cancel()
            return get.result()
        get.cancel()
        return "changed"


async def watch_routers(plane: ControlPlane, path: Path, every_s: float = 0.2) -> None:
    last = None
    while True:
        try:
            text = path.read_text()
        except OSError:
            text = None
        if text and text != last:
            try:
                await plane.set_routers(json.loads(text))
                last = text
            except ValueError as e:
                log.error("xds: %s is not valid: %s", path, e)
        await asyncio.sleep(every_s)


async def serve(port: int, clusters: list[dict], routers_file: Path | None = None,
                source=None, host: str = "127.0.0.1") -> None:
    """Serve ADS on host:port, the routers from `routers_file` or `source(plane)` (a
    coroutine that feeds it, e.g. from the Kubernetes API)."""
    plane = ControlPlane(clusters)
    service = Service("xds", port, host=host)
    service.add(ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server,
                AdsServicer(plane), "envoy.service.discovery.v3.AggregatedDiscoveryService")
    await service.start()
    watcher = asyncio.ensure_future(source(plane) if source is not None
                                    else watch_routers(plane, routers_file))
    await service.set_serving(True)
    await service.wait_for_termination(grace_s=0.5)
    watcher.cancel()


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    clusters = json.loads(Path(args.clusters).read_text())
    source = _endpoint_slices(args) if args.endpointslices else None
    asyncio.run(serve(args.port, clusters, Path(args.routers) if args.routers else None,
                      source, args.host))


def _endpoint_slices(args):
    """The routers from the Kubernetes API: a source for `serve`."""
    from llmesh.mesh import k8s_endpoints as k8s
    try:
        namespace, service = k8s.parse_target(args.endpointslices)
        api = k8s.KubeApi.in_cluster(args.k8s_api, args.k8s_token_file, args.k8s_ca_file)
    except k8s.KubeApiError as e:
        raise SystemExit(f"llmesh.mesh.xds: {e}")
    return lambda plane: k8s.watch_endpoint_slices(plane, api, namespace, service, args.poll_s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmesh.mesh.xds")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address ADS and health listen on (a pod: 0.0.0.0, for its probes)")
    p.add_argument("--clusters", required=True,
                   help="the clusters to serve, JSON (mesh.envoy.xds_clusters)")
    routers = p.add_mutually_exclusive_group(required=True)
    routers.add_argument("--routers", help="the routers file (JSON), watched")
    routers.add_argument("--endpointslices", metavar="[NAMESPACE/]SERVICE",
                         help="the routers' Service: its EndpointSlices, from the Kubernetes "
                              "API (mesh/k8s_endpoints.py)")
    p.add_argument("--k8s-api", default="",
                   help="the API's URL (default: the pod's, https://$KUBERNETES_SERVICE_HOST)")
    p.add_argument("--k8s-token-file", default="",
                   help="bearer token file (default: the pod's service account token)")
    p.add_argument("--k8s-ca-file", default="", help="the API's CA (default: the pod's)")
    p.add_argument("--poll-s", type=float, default=1.0,
                   help="seconds between reads of the EndpointSlices")
    return p


if __name__ == "__main__":
    main()
