"""A circuit breaker per replica, at the router, free of grpc.

Outcomes are *ok*, *busy* (the replica refused for load: RESOURCE_EXHAUSTED,
which says nothing about its health) and *broken* (the replica lost the
request, failed it, or its stream broke). The breaker opens when broken
outcomes pass `max_error_rate` of the last `window` outcomes (once at least
`min_samples` were seen), or after `max_consecutive` broken ones in a row. Open,
the replica gets no new requests for a backoff that doubles from `base_open_s`
to `max_open_s` with each failed trial; then it is half-open: one request goes
through as the trial, and its outcome closes or reopens the breaker.
"""
from __future__ import annotations

import time
from collections import deque
from enum import Enum

OK, BUSY, BROKEN = "ok", "busy", "broken"


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, window: int = 100, max_error_rate: float = 0.05, min_samples: int = 20,
                 max_consecutive: int = 5, base_open_s: float = 1.0, max_open_s: float = 30.0):
        self.window = window
        self.max_error_rate = max_error_rate
        self.min_samples = min_samples
        self.max_consecutive = max_consecutive
        self.base_open_s = base_open_s
        self.max_open_s = max_open_s
        self.state = State.CLOSED
        self.num_opened = 0
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = broken
        self._consecutive = 0
        self._open_s = base_open_s
        self._until = 0.0
        self._trial_out = False

    def allows(self, now: float | None = None) -> bool:
        """May a new request go to this replica now? (In half-open, only the trial.)"""
        now = time.monotonic() if now is None else now
        if self.state is State.OPEN and now >= self._until:
            self.state = State.HALF_OPEN
            self._trial_out = False
        if self.state is State.HALF_OPEN:
            return not self._trial_out
        return self.state is State.CLOSED

    def on_sent(self) -> None:
        """A request was sent; in half-open it is the trial."""
        if self.state is State.HALF_OPEN:
            self._trial_out = True

    def record(self, outcome: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if outcome == BUSY:
            return  # load, not health
        is_broken = outcome == BROKEN
        if self.state is State.HALF_OPEN:
            if is_broken:
                self._open(now, backoff=True)
            else:
                self._close()
            return
        self._outcomes.append(is_broken)
        self._consecutive = self._consecutive + 1 if is_broken else 0
        if self.state is State.CLOSED and (self._consecutive >= self.max_consecutive
                                           or self._error_rate_exceeded()):
            self._open(now, backoff=False)

    @property
    def error_rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def _error_rate_exceeded(self) -> bool:
        return len(self._outcomes) >= self.min_samples and self.error_rate > self.max_error_rate

    def _open(self, now: float, backoff: bool) -> None:
        if backoff:
            self._open_s = min(self.max_open_s, self._open_s * 2)
        self.state = State.OPEN
        self._until = now + self._open_s
        self.num_opened += 1

    def reset(self) -> None:
        """A new incarnation of the replica (its stream reconnected): a clean slate."""
        self._close()

    def _close(self) -> None:
        self.state = State.CLOSED
        self._outcomes.clear()
        self._consecutive = 0
        self._open_s = self.base_open_s
