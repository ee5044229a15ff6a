"""How late this router passes first tokens on: the part of a request's TTFT that
comes after the replica emitted its first token, which the replica's admission
cannot see.

Each request's first token carries the scheduler's emission time; when the
router hands that response on, the difference is the way back through this
router (its event loop and gRPC queue: under a flood, most of the wait). The
router takes the 90th percentile of the recent ones as a margin and moves each
new request's arrival earlier by it, so the replica refuses what would meet its
class's TTFT budget at the replica but not at the client. Samples older than
`horizon_s` are forgotten: after a burst, the margin goes back to nothing.
(Clocks: both stamps are wall-clock times of processes on the same host.)
"""
from __future__ import annotations

import time
from collections import deque

MAX_MARGIN_S = 5.0  # a stamp from a skewed clock cannot cost more than this


class ReturnLag:
    def __init__(self, window: int = 256, horizon_s: float = 10.0, quantile: float = 0.9):
        self.horizon_s = horizon_s
        self.quantile = quantile
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (when, lag)

    def observe(self, emitted_unix_s: float, now: float | None = None) -> None:
        """A first token the replica emitted at `emitted_unix_s` leaves the router now."""
        if emitted_unix_s <= 0:
            return
        now = time.time() if now is None else now
        self._samples.append((now, min(MAX_MARGIN_S, max(0.0, now - emitted_unix_s))))

    def margin_s(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        while self._samples and now - self._samples[0][0] > self.horizon_s:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        lags = sorted(lag for _, lag in self._samples)
        return lags[min(len(lags) - 1, int(self.quantile * len(lags)))]
