"""Per-tenant quotas and rate limits, in memory (one router) or in Redis (several
routers sharing one set of limits). Free of grpc.

Limits of a tenant (see tenants.TenantPolicy; 0 = unlimited, skipped):
- request bucket: capacity = requests_per_minute (one minute of burst; at least
  1 so a tenant below 1 rpm can still be admitted), refills at rpm/60 per second;
  every request costs 1.
- token bucket: capacity = tokens_per_minute, refills at tpm/60 per second; a
  request costs input + output tokens (prompt + max_tokens*n at admission).
- input / output quotas over fixed windows: window = floor(now / quota_window_s).

admit() checks every limit and consumes them only when all pass, atomically
(MemoryLimiter: no await between check and consume; RedisLimiter: one Lua
script). A rejected request consumes nothing. Usage counters are kept for
every tenant, limited or not, so usage() works for metrics too.

Rejection: the failing limit with the longest retry_after is reported. A request
that can never pass (more tokens than the token bucket holds, or more than a whole
window's quota) is permanent with retry_after 0; a permanent failure is reported
before any transient one.
"""
from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from llmesh.services.router.tenants import TenantPolicy

REASONS = ("rate_limit_requests", "rate_limit_tokens", "quota_input_tokens", "quota_output_tokens",
           "exceeds_rate_limit")
_EPS = 1e-9                 # float slack when comparing refilled bucket contents
_QUOTA_GRACE_S = 60         # Redis quota keys live this long past their window's end
_BUCKET_GRACE_S = 60        # Redis bucket keys live this long past a full refill


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""             # "" or one of REASONS
    retry_after_s: float = 0.0   # how long until this request could be admitted (0 when permanent or allowed)
    permanent: bool = False


ALLOWED = Decision(True)


@dataclass(frozen=True)
class Reservation:
    """What admit() took, so settle() can give back the unused part."""
    tenant: str
    input_tokens: int
    output_tokens: int
    window: int                  # quota window index the tokens were charged to
    quota_window_s: float
    tokens_per_minute: float     # the token bucket's rate at admission (0 = no bucket)


class LimiterUnavailable(RuntimeError):
    """The shared limiter state (Redis) can't be reached; the caller decides
    whether to fail open or closed (e.g. answer UNAVAILABLE)."""


def _request_capacity(rpm: float) -> float:
    return max(rpm, 1.0)


def _window(now: float, window_s: float) -> int:
    return math.floor(now / window_s)


class _Verdict:
    """Collects failures; keeps the one to report."""
    __slots__ = ("reason", "retry", "permanent")

    def __init__(self):
        self.reason, self.retry, self.permanent = "", -1.0, False

    def fail(self, reason: str, retry: float, permanent: bool = False) -> None:
        if permanent:
            if not self.permanent:
                self.reason, self.retry, self.permanent = reason, 0.0, True
        elif not self.permanent and retry > self.retry:
            self.reason, self.retry = reason, retry

    def decision(self) -> Decision:
        if not self.reason:
            return ALLOWED
        return Decision(False, self.reason, max(self.retry, 0.0), self.permanent)


def _check_tokens(input_tokens: int, output_tokens: int) -> None:
    if isinstance(input_tokens, bool) or isinstance(output_tokens, bool) \
            or input_tokens < 0 or output_tokens < 0 or input_tokens != int(input_tokens) \
            or output_tokens != int(output_tokens):
        raise ValueError(f"token counts must be integers >= 0, got input={input_tokens!r} output={output_tokens!r}")


class Limiter(ABC):
    """admit() checks ALL of a tenant's limits and, only if every one passes,
    consumes them atomically (request bucket 1, token bucket input+output, input
    quota input, output quota output). A rejected request consumes nothing.
    settle() gives back reserved-but-unused tokens (to the quota window they
    were reserved in, and to the token bucket, capped at its capacity); call it
    once per reservation."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    @abstractmethod
    async def admit(self, tenant: TenantPolicy, input_tokens: int, output_tokens: int,
                    now: float | None = None) -> tuple[Decision, Reservation | None]: ...

    @abstractmethod
    async def settle(self, reservation: Reservation, used_output_tokens: int, now: float | None = None,
                     used_input_tokens: int | None = None) -> None:
        """``used_input_tokens`` None keeps the whole input charged (the prompt
        was processed); pass 0 to refund it too, e.g. when the request never
        reached a replica."""

    @abstractmethod
    async def usage(self, tenant_name: str, quota_window_s: float, now: float | None = None) -> tuple[int, int]:
        """(input, output) tokens charged to the tenant in the current window."""

    async def close(self) -> None:
        return None


def _refunds(res: Reservation, used_output_tokens: int, used_input_tokens: int | None) -> tuple[int, int]:
    ref_out = max(0, res.output_tokens - max(0, int(used_output_tokens)))
    ref_in = 0 if used_input_tokens is None else max(0, res.input_tokens - max(0, int(used_input_tokens)))
    return ref_in, ref_out


# ---------------------------------------------------------------------------- memory

class _Bucket:
    __slots__ = ("tokens", "ts")

    def __init__(self, tokens: float, ts: float):
        self.tokens, self.ts = tokens, ts


def _refilled(b: _Bucket | None, rate_per_min: float, cap: float, now: float) -> tuple[float, float]:
    """Bucket contents at ``now`` (a missing bucket is full). Time never runs
    backwards for a bucket: an earlier ``now`` refills nothing."""
    if b is None:
        return cap, now
    tokens, ts = b.tokens, b.ts
    if now > ts:
        tokens += (now - ts) * rate_per_min / 60.0
        ts = now
    return min(tokens, cap), ts


class MemoryLimiter(Limiter):
    """Limits for one router, in process memory. asyncio-safe: admit() and
    settle() never await between checking and consuming."""

    def __init__(self, clock: Callable[[], float] = time.time):
        super().__init__(clock)
        self._req: dict[str, _Bucket] = {}
        self._tok: dict[str, _Bucket] = {}
        # (tenant, window_s) -> [window index, input used, output used]; only the current window is kept
        self._quota: dict[tuple[str, float], list] = {}

    def _counters(self, tenant: str, window_s: float, window: int, create: bool) -> list | None:
        c = self._quota.get((tenant, window_s))
        if c is not None and c[0] == window:
            return c
        if c is not None and c[0] > window:     # asked about a window older than the kept one
            return None
        if not create:
            return None
        c = [window, 0, 0]
        self._quota[(tenant, window_s)] = c
        return c

    async def admit(self, tenant: TenantPolicy, input_tokens: int, output_tokens: int,
                    now: float | None = None) -> tuple[Decision, Reservation | None]:
        _check_tokens(input_tokens, output_tokens)
        now = self._now(now)
        name, rpm, tpm = tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute
        window_s = tenant.quota_window_s
        window = _window(now, window_s)
        v = _Verdict()

        if rpm > 0:
            r_tokens, r_ts = _refilled(self._req.get(name), rpm, _request_capacity(rpm), now)
            if r_tokens + _EPS < 1.0:
                v.fail("rate_limit_requests", (1.0 - r_tokens) * 60.0 / rpm)
        cost = input_tokens + output_tokens
        if tpm > 0 and cost > 0:
            t_tokens, t_ts = _refilled(self._tok.get(name), tpm, tpm, now)
            if cost > tpm:
                v.fail("exceeds_rate_limit", 0.0, permanent=True)
            elif t_tokens + _EPS < cost:
                v.fail("rate_limit_tokens", (cost - t_tokens) * 60.0 / tpm)
        c = self._counters(name, window_s, window, create=False)
        used_in, used_out = (c[1], c[2]) if c is not None else (0, 0)
        window_left = (window + 1) * window_s - now
        in_lim, out_lim = tenant.input_tokens_per_window, tenant.output_tokens_per_window
        if in_lim > 0:
            if input_tokens > in_lim:
                v.fail("quota_input_tokens", 0.0, permanent=True)
            elif used_in + input_tokens > in_lim:
                v.fail("quota_input_tokens", window_left)
        if out_lim > 0:
            if output_tokens > out_lim:
                v.fail("quota_output_tokens", 0.0, permanent=True)
            elif used_out + output_tokens > out_lim:
                v.fail("quota_output_tokens", window_left)

        decision = v.decision()
        if not decision.allowed:
            return decision, None
        # consume: nothing above awaited, so no other admit() ran in between
        if rpm > 0:
            self._req[name] = _Bucket(r_tokens - 1.0, r_ts)
        if tpm > 0 and cost > 0:
            self._tok[name] = _Bucket(t_tokens - cost, t_ts)
        c = self._counters(name, window_s, window, create=True)
        if c is not None:
            c[1] += input_tokens
            c[2] += output_tokens
        return decision, Reservation(name, input_tokens, output_tokens, window, window_s, tpm)

    async def settle(self, reservation: Reservation, used_output_tokens: int, now: float | None = None,
                     used_input_tokens: int | None = None) -> None:
        now = self._now(now)
        ref_in, ref_out = _refunds(reservation, used_output_tokens, used_input_tokens)
        if ref_in + ref_out == 0:
            return
        c = self._counters(reservation.tenant, reservation.quota_window_s, reservation.window, create=False)
        if c is not None:
            c[1] = max(0, c[1] - ref_in)
            c[2] = max(0, c[2] - ref_out)
        tpm = reservation.tokens_per_minute
        b = self._tok.get(reservation.tenant)
        if tpm > 0 and b is not None:
            tokens, ts = _refilled(b, tpm, tpm, now)
            self._tok[reservation.tenant] = _Bucket(min(tpm, tokens + ref_in + ref_out), ts)

    async def usage(self, tenant_name: str, quota_window_s: float, now: float | None = None) -> tuple[int, int]:
        c = self._counters(tenant_name, float(quota_window_s), _window(self._now(now), quota_window_s), create=False)
        return (c[1], c[2]) if c is not None else (0, 0)


# ---------------------------------------------------------------------------- redis

# Buckets are hashes {t: tokens, ts: last refill time}; a missing bucket is full.
# Quota counters are a hash {in, out} per (tenant, window length, window index).
_LUA_COMMON = r"""
local EPS = 1e-9
local function num(x) return string.format('%.17g', x) end
local function refilled(key, rate, cap, now)
  local v = redis.call('HMGET', key, 't', 'ts')
  local t, ts = tonumber(v[1]), tonumber(v[2])
  if t == nil or ts == nil then return cap, now end
  if now > ts then
    t = t + (now - ts) * rate / 60.0
    ts = now
  end
  if t > cap then t = cap end
  return t, ts
end
local function store(key, t, ts, ttl_ms)
  redis.call('HSET', key, 't', num(t), 'ts', num(ts))
  redis.call('PEXPIRE', key, ttl_ms)
end
"""

# KEYS: request bucket, token bucket, quota hash
# ARGV: now, rpm, tpm, input limit, output limit, input tokens, output tokens,
#       window end, quota key ttl (ms), bucket grace (s)
_ADMIT_LUA = _LUA_COMMON + r"""
local now = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local in_lim, out_lim = tonumber(ARGV[4]), tonumber(ARGV[5])
local n_in, n_out = tonumber(ARGV[6]), tonumber(ARGV[7])
local window_end, quota_ttl = tonumber(ARGV[8]), tonumber(ARGV[9])
local grace = tonumber(ARGV[10])

local reason, retry, perm = '', -1, 0
local function fail(r, after, p)
  if p == 1 then
    if perm == 0 then reason, retry, perm = r, 0, 1 end
  elseif perm == 0 and after > retry then
    reason, retry = r, after
  end
end

local r_cap = math.max(rpm, 1.0)
local r_t, r_ts
if rpm > 0 then
  r_t, r_ts = refilled(KEYS[1], rpm, r_cap, now)
  if r_t + EPS < 1.0 then fail('rate_limit_requests', (1.0 - r_t) * 60.0 / rpm, 0) end
end
local cost = n_in + n_out
local t_t, t_ts
if tpm > 0 and cost > 0 then
  t_t, t_ts = refilled(KEYS[2], tpm, tpm, now)
  if cost > tpm then fail('exceeds_rate_limit', 0, 1)
  elseif t_t + EPS < cost then fail('rate_limit_tokens', (cost - t_t) * 60.0 / tpm, 0) end
end
local q = redis.call('HMGET', KEYS[3], 'in', 'out')
local used_in, used_out = tonumber(q[1]) or 0, tonumber(q[2]) or 0
if in_lim > 0 then
  if n_in > in_lim then fail('quota_input_tokens', 0, 1)
  elseif used_in + n_in > in_lim then fail('quota_input_tokens', window_end - now, 0) end
end
if out_lim > 0 then
  if n_out > out_lim then fail('quota_output_tokens', 0, 1)
  elseif used_out + n_out > out_lim then fail('quota_output_tokens', window_end - now, 0) end
end
if reason ~= '' then
  if retry < 0 then retry = 0 end
  return {0, reason, num(retry), perm}
end

if rpm > 0 then store(KEYS[1], r_t - 1.0, r_ts, math.ceil((r_cap * 60.0 / rpm + grace) * 1000)) end
if tpm > 0 and cost > 0 then store(KEYS[2], t_t - cost, t_ts, math.ceil((60.0 + grace) * 1000)) end
redis.call('HINCRBY', KEYS[3], 'in', n_in)
redis.call('HINCRBY', KEYS[3], 'out', n_out)
redis.call('PEXPIRE', KEYS[3], quota_ttl)
return {1, '', '0', 0}
"""

# KEYS: token bucket, quota hash of the reservation's window
# ARGV: now, tpm, input refund, output refund, bucket grace (s)
_SETTLE_LUA = _LUA_COMMON + r"""
local now, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local ref_in, ref_out = tonumber(ARGV[3]), tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ref_in > 0 and redis.call('HINCRBY', KEYS[2], 'in', -ref_in) < 0 then
    redis.call('HSET', KEYS[2], 'in', 0)
  end
  if ref_out > 0 and redis.call('HINCRBY', KEYS[2], 'out', -ref_out) < 0 then
    redis.call('HSET', KEYS[2], 'out', 0)
  end
end
if tpm > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local t, ts = refilled(KEYS[1], tpm, tpm, now)
  t = t + ref_in + ref_out
  if t > tpm then t = tpm end
  store(KEYS[1], t, ts, math.ceil((60.0 + grace) * 1000))
end
return 1
"""


def _fmt_window_s(window_s: float) -> str:
    return repr(float(window_s))


class RedisLimiter(Limiter):
    """Limits shared by several routers through one Redis. Every admit() is a
    single Lua script (EVALSHA), so check-and-consume is atomic across routers.
    Keys: ``llmesh:<prefix>:{<tenant>}:...`` (the tenant is a cluster hash tag,
    so one script's keys share a slot). Quota keys expire a minute after their
    window ends; bucket keys once a full refill has passed (a missing bucket
    is a full one).

    Times come from the caller (``now`` or the clock, default time.time), so
    routers should keep their clocks in sync (NTP); a bucket never refills
    backwards when a router's clock lags."""

    def __init__(self, redis_url: str, prefix: str = "llmesh", clock: Callable[[], float] = time.time,
                 timeout_s: float = 2.0):
        super().__init__(clock)
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
        if not redis_url:
            raise ValueError("RedisLimiter needs a redis URL, e.g. redis://127.0.0.1:6379/0")
        self.prefix = prefix
        self._base = f"llmesh:{prefix}:"
        self._redis = aioredis.from_url(redis_url, decode_responses=True,
                                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)

    def _key(self, tenant: str, *parts: str) -> str:
        return self._base + "{" + tenant + "}:" + ":".join(parts)

    def _quota_key(self, tenant: str, window_s: float, window: int) -> str:
        return self._key(tenant, "quota", _fmt_window_s(window_s), str(window))

    async def _call(self, script, keys: list[str], args: list) -> list:
        try:
            return await script(keys=keys, args=args)
        except self._errors as e:
            raise LimiterUnavailable(f"redis limiter unavailable: {type(e).__name__}: {e}") from e

    async def admit(self, tenant: TenantPolicy, input_tokens: int, output_tokens: int,
                    now: float | None = None) -> tuple[Decision, Reservation | None]:
        _check_tokens(input_tokens, output_tokens)
        now = self._now(now)
        name, window_s = tenant.name, tenant.quota_window_s
        window = _window(now, window_s)
        window_end = (window + 1) * window_s
        quota_ttl_ms = max(1, math.ceil((window_end - now + _QUOTA_GRACE_S) * 1000))
        keys = [self._key(name, "req"), self._key(name, "tok"), self._quota_key(name, window_s, window)]
        args = [repr(now), repr(float(tenant.requests_per_minute)), repr(float(tenant.tokens_per_minute)),
                int(tenant.input_tokens_per_window), int(tenant.output_tokens_per_window),
                int(input_tokens), int(output_tokens), repr(float(window_end)), quota_ttl_ms, _BUCKET_GRACE_S]
        allowed, reason, retry, permanent = await self._call(self._admit, keys, args)
        if int(allowed):
            return ALLOWED, Reservation(name, int(input_tokens), int(output_tokens), window, window_s,
                                        float(tenant.tokens_per_minute))
        return Decision(False, reason, float(retry), bool(int(permanent))), None

    async def settle(self, reservation: Reservation, used_output_tokens: int, now: float | None = None,
                     used_input_tokens: int | None = None) -> None:
        now = self._now(now)
        ref_in, ref_out = _refunds(reservation, used_output_tokens, used_input_tokens)
        if ref_in + ref_out == 0:
            return
        name = reservation.tenant
        keys = [self._key(name, "tok"), self._quota_key(name, reservation.quota_window_s, reservation.window)]
        args = [repr(now), repr(float(reservation.tokens_per_minute)), ref_in, ref_out, _BUCKET_GRACE_S]
        await self._call(self._settle, keys, args)

    async def usage(self, tenant_name: str, quota_window_s: float, now: float | None = None) -> tuple[int, int]:
        window = _window(self._now(now), quota_window_s)
        key = self._quota_key(tenant_name, quota_window_s, window)
        try:
            used_in, used_out = await self._redis.hmget(key, ["in", "out"])
        except self._errors as e:
            raise LimiterUnavailable(f"redis limiter unavailable: {type(e).__name__}: {e}") from e
        return int(used_in or 0), int(used_out or 0)

    async def close(self) -> None:
        await self._redis.aclose()


def make_limiter(state: str, redis_url: str = "", prefix: str = "llmesh") -> Limiter:
    """``state`` "memory" (one router) or "redis" (routers share limits through ``redis_url``)."""
    if state == "memory":
        return MemoryLimiter()
    if state == "redis":
        return RedisLimiter(redis_url, prefix=prefix)
    raise ValueError(f"admission state must be 'memory' or 'redis', got {state!r}")
