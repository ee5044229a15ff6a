"""The router's per-replica circuit breaker, on a clock the test moves."""
from llmesh.services.router.breaker import BROKEN, BUSY, OK, CircuitBreaker, State


def test_opens_on_consecutive_failures_and_half_opens_with_one_trial():
    b = CircuitBreaker(max_consecutive=3, base_open_s=1.0)
    for _ in range(2):
        b.record(BROKEN, now=0.0)
    assert b.allows(now=0.0)
    b.record(BROKEN, now=0.0)
    assert b.state is State.OPEN and not b.allows(now=0.5)
    assert b.allows(now=1.0) and b.state is State.HALF_OPEN  # the trial may go
    b.on_sent()
    assert not b.allows(now=1.1)  # ... and only the trial
    b.record(OK, now=1.2)
    assert b.state is State.CLOSED and b.allows(now=1.2)


def test_failed_trials_back_off_exponentially_up_to_the_cap():
    b = CircuitBreaker(max_consecutive=1, base_open_s=1.0, max_open_s=4.0)
    b.record(BROKEN, now=0.0)
    opens, now = [], 0.0
    for _ in range(4):
        while not b.allows(now=now):
            now += 0.25
        opens.append(now)
        b.on_sent()
        b.record(BROKEN, now=now)
    assert [round(b - a, 2) for a, b in zip(opens, opens[1:])] == [2.0, 4.0, 4.0]


def test_error_rate_over_the_window_opens_it_and_busy_does_not_count():
    b = CircuitBreaker(window=100, max_error_rate=0.05, min_samples=20, max_consecutive=100)
    for i in range(200):
        b.record(BUSY, now=0.0)  # a replica refusing for load is not broken
    assert b.state is State.CLOSED
    for i in range(95):
        b.record(OK, now=0.0)
    for i in range(5):
        b.record(BROKEN, now=0.0)
    assert b.state is State.CLOSED and b.error_rate == 0.05  # at the limit, not past it
    b.record(BROKEN, now=0.0)
    assert b.state is State.OPEN and b.num_opened == 1
