"""The router's margin for its own way back: the 90th percentile of recent first-token
lags, bounded, forgotten after its horizon."""
from llmesh.services.router.return_lag import MAX_MARGIN_S, ReturnLag


def test_margin_is_the_recent_90th_percentile_and_fades():
    lag = ReturnLag(horizon_s=10.0)
    assert lag.margin_s(now=100.0) == 0.0
    for i in range(100):  # lags of 0.00 .. 0.99 s
        lag.observe(emitted_unix_s=100.0 - i / 100, now=100.0)
    assert abs(lag.margin_s(now=100.0) - 0.90) < 1e-9
    assert lag.margin_s(now=109.9) > 0.8  # still within the horizon
    assert lag.margin_s(now=110.1) == 0.0  # a burst long over costs nothing


def test_skewed_or_missing_stamps_are_bounded_or_ignored():
    lag = ReturnLag()
    lag.observe(emitted_unix_s=0.0, now=50.0)  # (a response with no stamp)
    assert lag.margin_s(now=50.0) == 0.0
    lag.observe(emitted_unix_s=1.0, now=50.0)  # a skewed clock: 49 s, bounded
    lag.observe(emitted_unix_s=60.0, now=50.0)  # from the future: no negative margin
    assert lag.margin_s(now=50.0) == MAX_MARGIN_S
