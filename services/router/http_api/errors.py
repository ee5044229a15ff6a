"""Errors as OpenAI clients expect them: an HTTP status and a JSON body
`{"error": {"message", "type", "param", "code"}}`. The domain's errors (each
names a gRPC status, services/common/errors.py) map once, here."""
from __future__ import annotations

from llmesh.services.common.errors import LlmeshError

# status name -> (HTTP status, OpenAI error type)
_BY_CODE = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
    "UNIMPLEMENTED": (501, "not_implemented"),
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


def from_error(e: LlmeshError) -> ApiError:
    """The router's error as an HTTP error: its status, the field it names (the
    OpenAI `param`), and for a RESOURCE_EXHAUSTED its retry hint as Retry-After."""
    code = e.code
    status, type_ = _BY_CODE.get(code, (500, "server_error"))
    retry_after_s = 0.0
    if code == "RESOURCE_EXHAUSTED":
        retry_after_s = getattr(e, "retry_after_s", 0.0) or 1.0
    message = str(e) or code
    param = getattr(e, "field", None)
    if param is None and status == 400 and ":" in message:
        param = message.split(":", 1)[0]
        if " " in param or len(param) > 64:
            param = None
    return ApiError(status, message, type_, param, code.lower(), retry_after_s)
