"""Quotas and rate limits, both backends: in memory and in a real redis-server.

Time is injected (``now=``), never slept on."""
import asyncio
import uuid

import pytest

from redis_server import start_redis_or_skip
from llmesh.services.router.limits import (Decision, LimiterUnavailable, MemoryLimiter, RedisLimiter, make_limiter)
from llmesh.services.router.tenants import TenantPolicy

T0 = 3_600_000.0          # a quota window boundary for windows of 100 s and 3600 s


@pytest.fixture(scope="module")
def redis_url():
    server = start_redis_or_skip()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def new_limiter(request):
    """A factory: each call gives a limiter; every redis one of a test shares one key prefix
    (several routers on one Redis), distinct from other tests'."""
    if request.param == "memory":
        return lambda: MemoryLimiter(clock=lambda: pytest.fail("clock used despite explicit now"))
    url = request.getfixturevalue("redis_url")
    prefix = "t" + uuid.uuid4().hex[:12]
    return lambda: RedisLimiter(url, prefix=prefix, clock=lambda: pytest.fail("clock used despite explicit now"))


def run(limiter_or_factory, body):
    """Run ``body(limiter)`` on a fresh event loop and close the limiter."""
    async def main():
        lim = limiter_or_factory()
        try:
            return await body(lim)
        finally:
            await lim.close()
    return asyncio.run(main())


def test_requests_bucket(new_limiter):
    tenant = TenantPolicy(name="acme", requests_per_minute=60)     # refills 1 request/s

    async def body(lim):
        for i in range(60):
            d, res = await lim.admit(tenant, 1, 1, now=T0)
            assert d.allowed, i
            assert res is not None
        d, res = await lim.admit(tenant, 1, 1, now=T0)
        assert d == Decision(False, "rate_limit_requests", pytest.approx(1.0), False)
        assert res is None
        d, _ = await lim.admit(tenant, 1, 1, now=T0 + 0.25)
        assert not d.allowed and d.retry_after_s == pytest.approx(0.75)
        d, _ = await lim.admit(tenant, 1, 1, now=T0 + 1.0)            # one request refilled
        assert d.allowed
        d, _ = await lim.admit(tenant, 1, 1, now=T0 + 1.0)
        assert not d.allowed and d.reason == "rate_limit_requests"
        # a full refill never exceeds capacity: 60 more, then rejected
        later = T0 + 1000
        assert all([(await lim.admit(tenant, 0, 0, now=later))[0].allowed for _ in range(60)])
        assert not (await lim.admit(tenant, 0, 0, now=later))[0].allowed
    run(new_limiter, body)


def test_token_bucket_and_permanent_oversize(new_limiter):
    tenant = TenantPolicy(name="acme", tokens_per_minute=600)     # 10 tokens/s, 600 burst

    async def body(lim):
        d, _ = await lim.admit(tenant, 400, 100, now=T0)
        assert d.allowed
        d, _ = await lim.admit(tenant, 100, 100, now=T0)             # 100 left, needs 200
        assert d == Decision(False, "rate_limit_tokens", pytest.approx(10.0), False)
        d, _ = await lim.admit(tenant, 60, 40, now=T0)               # a smaller one still fits
        assert d.allowed
        d, _ = await lim.admit(tenant, 1, 0, now=T0)
        assert not d.allowed and d.retry_after_s == pytest.approx(0.1)
        d, _ = await lim.admit(tenant, 150, 50, now=T0 + 20)          # 200 refilled
        assert d.allowed
        d, _ = await lim.admit(tenant, 500, 101, now=T0 + 3600)       # more than the bucket can hold
        assert d == Decision(False, "exceeds_rate_limit", 0.0, True)
        d, _ = await lim.admit(tenant, 500, 100, now=T0 + 3600)       # exactly capacity is fine
        assert d.allowed
    run(new_limiter, body)


def test_quotas_and_window_rollover(new_limiter):
    tenant = TenantPolicy(name="acme", input_tokens_per_window=1000, output_tokens_per_window=300,
                          quota_window_s=100)

    async def body(lim):
        assert await lim.usage("acme", 100, now=T0) == (0, 0)
        assert (await lim.admit(tenant, 600, 100, now=T0 + 10))[0].allowed
        assert (await lim.admit(tenant, 400, 100, now=T0 + 20))[0].allowed
        assert await lim.usage("acme", 100, now=T0 + 20) == (1000, 200)
        d, _ = await lim.admit(tenant, 1, 10, now=T0 + 30)
        assert d == Decision(False, "quota_input_tokens", pytest.approx(70.0), False)
        d, _ = await lim.admit(tenant, 0, 101, now=T0 + 40)
        assert d == Decision(False, "quota_output_tokens", pytest.approx(60.0), False)
        assert (await lim.admit(tenant, 0, 100, now=T0 + 40))[0].allowed   # output quota exactly full
        assert await lim.usage("acme", 100, now=T0 + 40) == (1000, 300)
        # next window: fresh quota, old window's usage no longer counts
        assert await lim.usage("acme", 100, now=T0 + 100) == (0, 0)
        d, _ = await lim.admit(tenant, 1000, 300, now=T0 + 100)
        assert d.allowed
        assert await lim.usage("acme", 100, now=T0 + 150) == (1000, 300)
        # a request larger than a whole window's quota can never pass
        d, _ = await lim.admit(tenant, 1001, 0, now=T0 + 500)
        assert d == Decision(False, "quota_input_tokens", 0.0, True)
        d, _ = await lim.admit(tenant, 0, 301, now=T0 + 500)
        assert d == Decision(False, "quota_output_tokens", 0.0, True)
        # usage is per tenant
        assert await lim.usage("other", 100, now=T0 + 150) == (0, 0)
    run(new_limiter, body)


def test_rejected_request_consumes_nothing(new_limiter):
    tenant = TenantPolicy(name="acme", requests_per_minute=3, tokens_per_minute=600,
                          input_tokens_per_window=1000, output_tokens_per_window=1000, quota_window_s=3600)

    async def body(lim):
        assert (await lim.admit(tenant, 300, 200, now=T0))[0].allowed   # bucket 100 left, 2 requests left
        for _ in range(5):       # each fails on the token bucket only; nothing else may be taken
            d, res = await lim.admit(tenant, 100, 100, now=T0)
            assert d.reason == "rate_limit_tokens" and res is None
        assert await lim.usage("acme", 3600, now=T0) == (300, 200)
        assert (await lim.admit(tenant, 60, 40, now=T0))[0].allowed      # the whole remaining bucket
        assert (await lim.admit(tenant, 0, 0, now=T0))[0].allowed        # the third request
        d, _ = await lim.admit(tenant, 0, 0, now=T0)
        assert d.reason == "rate_limit_requests"
        assert await lim.usage("acme", 3600, now=T0) == (360, 240)
    run(new_limiter, body)


def test_longest_retry_after_is_reported(new_limiter):
    tenant = TenantPolicy(name="acme", requests_per_minute=2, tokens_per_minute=60,
                          input_tokens_per_window=100, quota_window_s=3600)

    async def body(lim):
        assert (await lim.admit(tenant, 50, 10, now=T0))[0].allowed    # token bucket now empty
        assert (await lim.admit(tenant, 0, 0, now=T0))[0].allowed      # request bucket now empty
        # requests 30 s, tokens 60 s, input quota until the window ends at T0 + 3600
        d, _ = await lim.admit(tenant, 60, 0, now=T0)
        assert d == Decision(False, "quota_input_tokens", pytest.approx(3600.0), False)
        d, _ = await lim.admit(tenant, 10, 50, now=T0 + 10)          # requests 20 s, tokens 50 s
        assert d == Decision(False, "rate_limit_tokens", pytest.approx(50.0), False)
        d, _ = await lim.admit(tenant, 10, 10, now=T0 + 10)          # requests 20 s, tokens 10 s
        assert d == Decision(False, "rate_limit_requests", pytest.approx(20.0), False)
        d, _ = await lim.admit(tenant, 10, 51, now=T0 + 10)          # permanent beats transient
        assert d == Decision(False, "exceeds_rate_limit", 0.0, True)
    run(new_limiter, body)


def test_settle_refunds_unused_output(new_limiter):
    tenant = TenantPolicy(name="acme", tokens_per_minute=600, output_tokens_per_window=500, quota_window_s=100)

    async def body(lim):
        d, res = await lim.admit(tenant, 100, 400, now=T0)
        assert d.allowed and res.output_tokens == 400 and res.input_tokens == 100
        assert await lim.usage("acme", 100, now=T0) == (100, 400)
        assert not (await lim.admit(tenant, 0, 200, now=T0))[0].allowed
        await lim.settle(res, used_output_tokens=150, now=T0)
        assert await lim.usage("acme", 100, now=T0) == (100, 150)
        d, res2 = await lim.admit(tenant, 0, 350, now=T0)           # refunded to quota and bucket
        assert d.allowed
        assert not (await lim.admit(tenant, 0, 1, now=T0))[0].allowed
        # refunds to the bucket are capped at its capacity (600, not 600 + 350)
        await lim.settle(res2, used_output_tokens=0, now=T0 + 3000)
        assert (await lim.admit(tenant, 600, 0, now=T0 + 3000))[0].allowed
        d, _ = await lim.admit(tenant, 1, 0, now=T0 + 3000)
        assert d.reason == "rate_limit_tokens"
        # a refund for a past window leaves the current window alone
        d, res3 = await lim.admit(tenant, 0, 500, now=T0 + 4000)
        assert d.allowed
        await lim.settle(res3, used_output_tokens=0, now=T0 + 4100)
        assert await lim.usage("acme", 100, now=T0 + 4100) == (0, 0)
        d, res4 = await lim.admit(tenant, 0, 200, now=T0 + 4100)
        assert d.allowed
        assert await lim.usage("acme", 100, now=T0 + 4100) == (0, 200)
        # used more than reserved: no refund, no negative usage
        await lim.settle(res4, used_output_tokens=999, now=T0 + 4100)
        assert await lim.usage("acme", 100, now=T0 + 4100) == (0, 200)
        # used_input_tokens=0: the request never ran, give its input back too
        d, res5 = await lim.admit(tenant, 70, 30, now=T0 + 4100)
        assert d.allowed
        assert await lim.usage("acme", 100, now=T0 + 4100) == (70, 230)
        await lim.settle(res5, used_output_tokens=0, used_input_tokens=0, now=T0 + 4100)
        assert await lim.usage("acme", 100, now=T0 + 4100) == (0, 200)
    run(new_limiter, body)


def test_unlimited_tenant_is_always_admitted_and_counted(new_limiter):
    tenant = TenantPolicy(name="free")

    async def body(lim):
        for i in range(20):
            d, res = await lim.admit(tenant, 10_000, 10_000, now=T0 + i)
            assert d.allowed and res is not None
        assert await lim.usage("free", 3600, now=T0 + 20) == (200_000, 200_000)
    run(new_limiter, body)


def test_tenants_are_isolated(new_limiter):
    a = TenantPolicy(name="a", requests_per_minute=2)
    b = TenantPolicy(name="b", requests_per_minute=2)

    async def body(lim):
        for _ in range(2):
            assert (await lim.admit(a, 1, 1, now=T0))[0].allowed
        assert not (await lim.admit(a, 1, 1, now=T0))[0].allowed
        assert (await lim.admit(b, 1, 1, now=T0))[0].allowed
    run(new_limiter, body)


def test_concurrent_admits_never_over_admit(new_limiter):
    tenant = TenantPolicy(name="acme", requests_per_minute=100, input_tokens_per_window=200, quota_window_s=3600)

    async def body(lim):
        results = await asyncio.gather(*(lim.admit(tenant, 10, 5, now=T0) for _ in range(50)))
        assert sum(d.allowed for d, _ in results) == 20
        assert all(d.reason == "quota_input_tokens" for d, _ in results if not d.allowed)
        assert await lim.usage("acme", 3600, now=T0) == (200, 100)
    run(new_limiter, body)


def test_bad_token_counts(new_limiter):
    async def body(lim):
        with pytest.raises(ValueError):
            await lim.admit(TenantPolicy(name="a"), -1, 0, now=T0)
    run(new_limiter, body)


# ---------------------------------------------------------------------------- redis only

def test_two_routers_share_one_quota_and_rate_limit(redis_url):
    prefix = "t" + uuid.uuid4().hex[:12]
    tenant = TenantPolicy(name="acme", requests_per_minute=30, input_tokens_per_window=1000,
                          output_tokens_per_window=1000, quota_window_s=3600)

    async def main():
        r1, r2 = RedisLimiter(redis_url, prefix=prefix), RedisLimiter(redis_url, prefix=prefix)
        other = RedisLimiter(redis_url, prefix=prefix + "x")    # another mesh on the same Redis
        try:
            # 50 concurrent admits split across two routers; 25 fit in 1000 input tokens at 40 each
            reqs = [(r1 if i % 2 else r2).admit(tenant, 40, 10, now=T0) for i in range(50)]
            results = await asyncio.gather(*reqs)
            allowed = [d for d, _ in results if d.allowed]
            assert len(allowed) == 25
            assert await r1.usage("acme", 3600, now=T0) == (1000, 250)
            assert await r2.usage("acme", 3600, now=T0) == (1000, 250)
            # rate limit: 5 requests left in the shared bucket, whichever router asks
            assert [(await r.admit(tenant, 0, 0, now=T0))[0].allowed for r in (r1, r2) * 3] == [True] * 5 + [False]
            # a reservation taken through one router settles through the other
            d, res = await r1.admit(tenant, 0, 500, now=T0 + 120)
            assert d.allowed
            await r2.settle(res, used_output_tokens=100, now=T0 + 120)
            assert await r1.usage("acme", 3600, now=T0 + 120) == (1000, 350)
            # a different prefix is a different set of limits
            assert await other.usage("acme", 3600, now=T0) == (0, 0)
            assert (await other.admit(tenant, 40, 10, now=T0))[0].allowed
        finally:
            for r in (r1, r2, other):
                await r.close()
    asyncio.run(main())


def test_redis_keys_are_prefixed_and_expire(redis_url):
    import redis.asyncio as aioredis
    prefix = "t" + uuid.uuid4().hex[:12]
    tenant = TenantPolicy(name="acme", requests_per_minute=60, tokens_per_minute=600,
                          input_tokens_per_window=100, quota_window_s=100)

    async def main():
        lim = RedisLimiter(redis_url, prefix=prefix)
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            import time
            now = time.time()
            assert (await lim.admit(tenant, 10, 10, now=now))[0].allowed
            keys = sorted(await client.keys(f"llmesh:{prefix}:*"))
            assert len(keys) == 3 and all("{acme}" in k for k in keys)
            for k in keys:
                ttl = await client.pttl(k)
                assert 0 < ttl <= (100 + 60 + 1) * 1000 + 1000, (k, ttl)
        finally:
            await client.aclose()
            await lim.close()
    asyncio.run(main())


def test_redis_unreachable_raises_limiter_unavailable():
    import socket
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        lim = RedisLimiter(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
        try:
            with pytest.raises(LimiterUnavailable):
                await lim.admit(TenantPolicy(name="a", requests_per_minute=1), 1, 1, now=T0)
        finally:
            await lim.close()
    asyncio.run(main())


def test_make_limiter(redis_url):
    assert isinstance(make_limiter("memory"), MemoryLimiter)
    lim = make_limiter("redis", redis_url, prefix="p")
    assert isinstance(lim, RedisLimiter)
    asyncio.run(lim.close())
    with pytest.raises(ValueError):
        make_limiter("redis")
    with pytest.raises(ValueError):
        make_limiter("etcd")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_injected_clock_is_used_when_now_is_omitted(backend, request):
    clock = [T0]
    tenant = TenantPolicy(name="acme", requests_per_minute=60, input_tokens_per_window=10, quota_window_s=100)
    if backend == "memory":
        factory = lambda: MemoryLimiter(clock=lambda: clock[0])      # noqa: E731
    else:
        url, prefix = request.getfixturevalue("redis_url"), "t" + uuid.uuid4().hex[:12]
        factory = lambda: RedisLimiter(url, prefix=prefix, clock=lambda: clock[0])    # noqa: E731

    async def body(lim):
        assert (await lim.admit(tenant, 10, 0))[0].allowed
        d, _ = await lim.admit(tenant, 1, 0)
        assert d == Decision(False, "quota_input_tokens", pytest.approx(100.0), False)
        assert await lim.usage("acme", 100) == (10, 0)
        clock[0] = T0 + 100
        assert await lim.usage("acme", 100) == (0, 0)
        assert (await lim.admit(tenant, 1, 0))[0].allowed
    run(factory, body)
