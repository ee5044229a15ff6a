"""grpc.aio server bootstrap shared by every service.

Health (NOT_SERVING until the service says it is warm; NOT_SERVING first on
drain), reflection, message size limits, loopback binding, graceful shutdown
on SIGTERM / SIGINT, and the mapping of domain errors to gRPC status codes.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmesh.services.common.errors import LlmeshError
from llmesh.services.common.heap import freeze_startup
from llmesh.services.common.net import bind_host
from llmesh.services.common.open_files import raise_open_files

MAX_MESSAGE_BYTES = 4 * 2**20
log = logging.getLogger("llmesh")


def status_of(error: LlmeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


async def abort_with(context: grpc.aio.ServicerContext, error: LlmeshError):
    """Abort with the error's status; a retry hint rides in the trailers as
    `grpc-retry-pushback-ms` (gRPC's retry pushback) and `retry-after-ms`."""
    retry_after_s = getattr(error, "retry_after_s", 0.0)
    if retry_after_s:
        ms = str(max(1, int(retry_after_s * 1000)))
        context.set_trailing_metadata((("grpc-retry-pushback-ms", ms), ("retry-after-ms", ms)))
    await context.abort(status_of(error), str(error))


class Service:
    """A grpc.aio server on `bind_host()`:port with health and (optionally) reflection.

    `traced`: install the OpenTelemetry server interceptor (when tracing is on).
    Only services that receive a request over a unary hop need it (router,
    tokenizer, the kvcache index's Match); the others get trace context inside
    their stream messages and would only pay the interceptor's call path on every
    step. `untraced_methods`: methods of a traced service left out. `credentials`:
    TLS only on the port (services/common/mtls.py), else plaintext."""

    def __init__(self, name: str, port: int, host: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, traced: bool = False,
                 untraced_methods: tuple[str, ...] = (),
                 credentials: grpc.ServerCredentials | None = None):
        self.name = name
        host = host or bind_host()
        from llmesh.observability import telemetry
        interceptors = telemetry.server_interceptors(untraced_methods) if traced else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"{host}:{port}"
        if credentials is not None:
            self.server.add_secure_port(self.address, credentials)
        else:
            self.server.add_insecure_port(self.address)
        self._service_names: list[str] = []
        self._stop = asyncio.Event()
        self._started_up = False

    def add(self, adder: Callable, servicer, service_name: str) -> None:
        adder(servicer, self.server)
        self._service_names.append(service_name)

    def add_public(self, servicer, service_descriptor) -> None:
        """A service facing untrusted clients: undecodable requests get INVALID_ARGUMENT."""
        from llmesh.services.common.public_handlers import public_service_handler
        self.server.add_generic_rpc_handlers((public_service_handler(servicer,
                                                                      service_descriptor),))
        self._service_names.append(service_descriptor.full_name)

    def enable_reflection(self) -> None:
        reflection.enable_server_reflection(
            self._service_names + [reflection.SERVICE_NAME, health.SERVICE_NAME], self.server)

    async def set_serving(self, is_serving: bool) -> None:
        """SERVING or NOT_SERVING on every service; the first SERVING ends start-up, and
        what start-up made leaves the collector's way (heap.freeze_startup)."""
        if is_serving and not self._started_up:
            self._started_up = True
            freeze_startup()
        status = (health_pb2.HealthCheckResponse.SERVING if is_serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        raise_open_files()  # (a flood's connections must not run out of descriptors)
        await self.set_serving(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("%s listening on %s", self.name, self.address)

    async def wait_for_termination(self, grace_s: float = 5.0, before_stop=None) -> None:
        """Until SIGTERM / SIGINT / stop(); then `before_stop()` (a coroutine function:
        a drain that lets running work finish), NOT_SERVING, and the server stops."""
        await self._stop.wait()
        if before_stop is not None:
            await before_stop()
        log.info("%s draining", self.name)
        await self.set_serving(False)  # Envoy / routers stop sending new work first
        await self.server.stop(grace_s)

    def stop(self) -> None:
        self._stop.set()

