"""The router's Inference API called in-process, for the HTTP API it serves
beside gRPC: the same handlers, admission, tracing and metrics, without a
network hop. Calls look like grpc.aio stub calls (`Generate` is an async
iterable with `cancel()`, `Complete` / `ListModels` are awaitable tasks) and
fail with a grpc.RpcError carrying the status, details and trailers the
handler aborted with, so one HTTP layer serves both."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2


class LocalRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers=()):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers


class LocalContext:
    """What the handlers use of a grpc.aio ServicerContext."""

    def __init__(self, metadata: tuple = ()):
        self._metadata = tuple(metadata)
        self._code = None
        self._trailers: tuple = ()

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return None  # no client deadline: the class deadline or timeout_ms applies

    def set_trailing_metadata(self, trailers) -> None:
        self._trailers = tuple(trailers)

    def code(self):
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        self._code = code
        raise LocalRpcError(code, details, self._trailers)


class _StreamCall:
    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self._agen

    def cancel(self) -> None:
        # the reader's task is cancelled with it (streams.Upstream); closing the
        # generator there runs the handler's cleanup (cancel upstream, settle)
        pass


class LocalInference:
    """A stub-like client of an `Inference` servicer in this process."""

    def __init__(self, inference):
        self.inference = inference

    def Generate(self, request, metadata=(), timeout=None):
        return _StreamCall(self.inference.Generate(request, LocalContext(metadata)))

    def Complete(self, request, metadata=(), timeout=None):
        return asyncio.ensure_future(self.inference.Complete(request, LocalContext(metadata)))

    def ListModels(self, request, metadata=(), timeout=None):
        return asyncio.ensure_future(self.inference.ListModels(request, LocalContext(metadata)))


class LocalHealth:
    """SERVING while the router has a ready replica (what its gRPC health says)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    async def Check(self, request=None, timeout=None):
        status = (health_pb2.HealthCheckResponse.SERVING if self.dispatcher.is_ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)
