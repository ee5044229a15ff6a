"""SLO-aware admission: refuse at once what would wait past its class's TTFT budget.

A request's queue wait is predicted as the prompt tokens that will be admitted
before it (queued in its class and in classes that outrank it, plus its own)
over the rate at which the replica drains its queue. That rate is measured,
not assumed: prompt tokens leaving the waiting queue per second, counted only
while the queue is non-empty, so it is the replica's capacity under backlog
(slots, KV and step time all included) and not the current demand. Until a
backlog has been seen there is no estimate, and nothing is refused: an empty
queue means no wait.
"""
from __future__ import annotations

import time


class DrainRate:
    """Prompt tokens admitted per second while requests wait (smoothed)."""

    def __init__(self, window_s: float = 0.5, smoothing: float = 0.3):
        self.window_s = window_s
        self.smoothing = smoothing
        self.tokens_per_s = 0.0  # 0 = not measured yet
        self._tokens = 0
        self._elapsed = 0.0
        self._last: float | None = None

    def observe(self, num_left: int, is_backlogged: bool, now: float | None = None) -> None:
        """After a scheduling round: `num_left` prompt tokens left the queue, which
        was non-empty before it (`is_backlogged`)."""
        now = time.monotonic() if now is None else now
        if self._last is not None and is_backlogged:
            self._elapsed += now - self._last
            self._tokens += max(0, num_left)
            if self._elapsed >= self.window_s:
                rate = self._tokens / self._elapsed
                self.tokens_per_s = rate if not self.tokens_per_s else \
                    (1 - self.smoothing) * self.tokens_per_s + self.smoothing * rate
                self._tokens, self._elapsed = 0, 0.0
        self._last = now

    def predict_wait(self, tokens_ahead: int) -> float | None:
        """Seconds until `tokens_ahead` prompt tokens are admitted (None: no estimate)."""
        if not self.tokens_per_s:
            return None
        return tokens_ahead / self.tokens_per_s
