"""Errors as OpenAI clients expect them: an HTTP status and a JSON body
`{"error": {"message", "type", "param", "code"}}`; gRPC statuses map once, here."""
from __future__ import annotations

import grpc

# gRPC status -> (HTTP status, OpenAI error type)
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
}


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float = 0.0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if not self.retry_after_s:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after_s))),
                "retry-after-ms": str(max(1, int(self.retry_after_s * 1000)))}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param or None)


def from_rpc_error(e: grpc.aio.AioRpcError | grpc.RpcError) -> ApiError:
    """The router's status as an HTTP error; a RESOURCE_EXHAUSTED's retry hint
    (trailer `retry-after-ms`) becomes Retry-After."""
    code = e.code()
    status, type_ = _BY_CODE.get(code, (500, "server_error"))
    retry_after_s = 0.0
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        for key, value in (e.trailing_metadata() or ()):
            if key == "retry-after-ms":
                try:
                    retry_after_s = int(value) / 1000
                except ValueError:
                    pass
        retry_after_s = retry_after_s or 1.0
    message = e.details() or code.name
    param = message.split(":", 1)[0] if status == 400 and ":" in message else None
    if param and (" " in param or len(param) > 64):
        param = None
    return ApiError(status, message, type_, param, code.name.lower(), retry_after_s)
