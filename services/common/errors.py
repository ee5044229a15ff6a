"""Typed errors of the domain. Each maps to one gRPC status at the service edge.

Core modules raise these (never grpc errors); `services/common` maps them to
status codes so the same error reads the same whichever hop raised it.
"""
from __future__ import annotations


class LlmeshError(Exception):
    """Base of every error a user can cause. `code` names the gRPC status."""

    code = "INTERNAL"


class InvalidRequestError(LlmeshError):
    """A request field is out of range or malformed. Maps to INVALID_ARGUMENT."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnsupportedModelError(LlmeshError):
    """The checkpoint's architecture or format is not one llmesh can run."""

    code = "FAILED_PRECONDITION"


class DuplicateRequestError(LlmeshError):
    """A request id that is already in flight. Maps to ALREADY_EXISTS."""

    code = "ALREADY_EXISTS"

    def __init__(self, request_id: str):
        super().__init__(f"request_id: {request_id!r} is already in flight")
        self.request_id = request_id


class UnauthenticatedError(LlmeshError):
    """No API key, or one no tenant holds. Maps to UNAUTHENTICATED."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(LlmeshError):
    """The tenant may not use this model or priority class. Maps to PERMISSION_DENIED."""

    code = "PERMISSION_DENIED"


class DrainingError(LlmeshError):
    """The replica is draining (to restart): it takes no new request, which belongs
    on another replica. Maps to UNAVAILABLE, reason "draining"."""

    code = "UNAVAILABLE"
    reason = "draining"


class LimitExceededError(LlmeshError):
    """A rate limit, quota or full queue. Maps to RESOURCE_EXHAUSTED with retry pushback."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, reason: str, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class NotFoundError(LlmeshError):
    """A model (or other named thing) this service does not serve. Maps to NOT_FOUND."""

    code = "NOT_FOUND"


class UnavailableError(LlmeshError):
    """No replica can take or finish the request now. Maps to UNAVAILABLE."""

    code = "UNAVAILABLE"


class DeadlineExceededError(LlmeshError):
    """The request's deadline passed. Maps to DEADLINE_EXCEEDED."""

    code = "DEADLINE_EXCEEDED"


class UpstreamError(LlmeshError):
    """An error another service answered with, passed on with its status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
