"""Admission at the router, free of grpc: who is asking, may they, and is there room.

In order, each step refusing before the next one spends anything:
1. authenticate the API key to a tenant (UNAUTHENTICATED);
2. the model and priority class must be the tenant's (PERMISSION_DENIED);
3. per-request caps on prompt and output tokens (INVALID_ARGUMENT);
4. rate limits and quotas, checked and taken in one atomic step by the limiter
   (RESOURCE_EXHAUSTED with a retry hint); a rejected request takes nothing.
What is reserved (max_tokens * n output tokens) is settled to what was actually
generated when the request ends, or given back whole when the scheduler refuses it.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from llmesh.services.common.errors import (InvalidRequestError, LimitExceededError, LlmeshError,
                                    PermissionDeniedError, UnauthenticatedError)
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.router.limits import Limiter, LimiterUnavailable, Reservation, make_limiter
from llmesh.services.router.tenants import TenantDirectory, TenantPolicy, key_from_metadata

class LimitsUnavailableError(LlmeshError):
    """The shared limit state (Redis) cannot be reached: fail closed, retryable."""

    code = "UNAVAILABLE"


DEFAULT_CLASS_TIMEOUTS = {"interactive": 0.0, "standard": 0.0, "batch": 0.0}


# Envoy stamps each request with the time it reached the gateway (seconds since
# the epoch); the TTFT budget counts from there, so time a request spent queued
# before the router's handler ran (a router whose CPU is saturated) counts too.
GATEWAY_START_HEADER = "x-llmesh-gateway-start"


def arrival_time(metadata: Iterable[tuple[str, str]], now: float) -> float:
    """When the request arrived: the gateway's stamp, or `now` (no gateway, or a
    stamp that is not a number). Clamped to the last minute: a stamp from the
    future, or from a skewed clock, cannot buy or cost more than that."""
    for key, value in metadata:
        if key == GATEWAY_START_HEADER:
            try:
                return min(now, max(float(value), now - 60.0))
            except ValueError:
                return now
    return now

@dataclass
class Ticket:
    """An admitted request: its tenant, class, deadline, cache salt and reservation."""

    tenant: TenantPolicy
    cls: str
    deadline_s: float  # unix time; 0 = none
    salt: str
    reservation: Reservation | None = None


class Admission:
    def __init__(self, tenants: TenantDirectory, limiter: Limiter, *,
                 max_prompt_tokens: int = 0, max_output_tokens: int = 0,
                 class_timeouts: dict[str, float] | None = None,
                 share_prefix_cache: bool = False):
        self.tenants = tenants
        self.limiter = limiter
        self.max_prompt_tokens = max_prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.class_timeouts = {**DEFAULT_CLASS_TIMEOUTS, **(class_timeouts or {})}
        self.share_prefix_cache = share_prefix_cache

    @classmethod
    def from_dict(cls, d: dict) -> "Admission":
        """From mesh.yaml's `admission` section (as the supervisor passes it)."""
        keys_file = d.get("keys_file") or ""
        tenants = TenantDirectory.load(keys_file) if keys_file else TenantDirectory.open()
        limiter = make_limiter(d.get("state", "memory"), d.get("redis_url", ""))
        timeouts = {name: c.get("timeout_s", 0.0) for name, c in (d.get("classes") or {}).items()
                    if c and "timeout_s" in c}
        return cls(tenants, limiter, max_prompt_tokens=d.get("max_prompt_tokens", 0),
                   max_output_tokens=d.get("max_output_tokens", 0), class_timeouts=timeouts,
                   share_prefix_cache=d.get("share_prefix_cache", False))

    # ---- who, and may they ---------------------------------------------
    def authorize(self, metadata: Iterable[tuple[str, str]], model: str,
                  priority: str | None) -> tuple[TenantPolicy, str]:
        """The tenant and the request's class; raises Unauthenticated/PermissionDenied."""
        tenant = self.tenants.authenticate(key_from_metadata(metadata))
        if tenant is None:
            raise UnauthenticatedError("a valid API key is required "
                                       "(authorization: Bearer KEY or x-api-key)")
        if not tenant.may_use_model(model):
            raise PermissionDeniedError(f"model: {model!r} is not available to this tenant")
        cls = priority or tenant.default_class
        if not tenant.may_use_class(cls):
            raise PermissionDeniedError(f"priority: class {cls!r} is not available to this tenant")
        return tenant, cls

    def output_cap(self, tenant: TenantPolicy) -> int:
        """The most output tokens one sequence of `tenant` may ask for; 0 = no cap."""
        return _tightest(self.max_output_tokens, tenant.max_output_tokens)

    def check_caps(self, tenant: TenantPolicy, num_prompt_tokens: int,
                   params: SamplingParams) -> None:
        cap = _tightest(self.max_prompt_tokens, tenant.max_prompt_tokens)
        if cap and num_prompt_tokens > cap:
            raise InvalidRequestError("prompt", f"{num_prompt_tokens} tokens; the cap is {cap}")
        cap = self.output_cap(tenant)
        if cap and params.max_tokens > cap:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens}; the cap is {cap}")

    # ---- is there room ---------------------------------------------------
    async def reserve(self, tenant: TenantPolicy, num_prompt_tokens: int,
                      params: SamplingParams) -> Reservation | None:
        try:
            decision, reservation = await self.limiter.admit(
                tenant, num_prompt_tokens, params.max_tokens * params.n)
        except LimiterUnavailable as e:
            raise LimitsUnavailableError(f"limit state is unreachable: {e}") from None
        if not decision.allowed:
            what = decision.reason.replace("_", " ")
            hint = "" if decision.permanent else f"; retry in {decision.retry_after_s:.2f} s"
            raise LimitExceededError(decision.reason, f"{what} of tenant {tenant.name!r}{hint}",
                                     0.0 if decision.permanent else decision.retry_after_s)
        return reservation

    async def settle(self, ticket: Ticket, used_output_tokens: int) -> None:
        if ticket.reservation is not None:
            reservation, ticket.reservation = ticket.reservation, None
            await self.limiter.settle(reservation, used_output_tokens)

    async def give_back(self, ticket: Ticket) -> None:
        """The request was refused downstream (queue full): its tokens are given back
        (the request-rate bucket keeps the attempt)."""
        if ticket.reservation is not None:
            reservation, ticket.reservation = ticket.reservation, None
            await self.limiter.settle(reservation, 0, used_input_tokens=0)

    def deadline(self, cls: str, timeout_ms: int, grpc_remaining_s: float | None,
                 now: float | None = None) -> float:
        """The earliest of the request's timeout, its class default and the gRPC deadline."""
        now = time.time() if now is None else now
        limits = [timeout_ms / 1000.0 if timeout_ms else self.class_timeouts.get(cls, 0.0),
                  grpc_remaining_s or 0.0]
        limits = [x for x in limits if x > 0]
        return now + min(limits) if limits else 0.0

    def salt(self, tenant: TenantPolicy) -> str:
        return "" if self.share_prefix_cache else tenant.cache_salt

    async def close(self) -> None:
        await self.limiter.close()


def _tightest(*caps: int) -> int:
    caps = [c for c in caps if c]
    return min(caps) if caps else 0
