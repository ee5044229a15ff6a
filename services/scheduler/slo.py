"""SLO-aware admission: refuse at once what would wait past its class's TTFT budget.

A request's queue wait is predicted as the prompt tokens that will be admitted
before it (queued in its class and in classes that outrank it, plus its own)
over the rate at which the replica drains its queue. That rate is measured,
not assumed: prompt tokens leaving the waiting queue per second, counted only
while requests are left waiting after a round, so it is the replica's capacity under backlog
(slots, KV and step time all included) and not the current demand. Until a
backlog has been seen there is no estimate, and nothing is refused: an empty
queue means no wait.
"""
from __future__ import annotations

import time
from collections import deque


class DrainRate:
    """Prompt tokens admitted per second while requests wait, over the last
    `horizon_s` seconds of backlog. Admissions come in bursts (a round frees
    several slots at once, then none for a while), so the rate is a sum over a
    window that spans several rounds, never one short interval's rate."""

    def __init__(self, horizon_s: float = 3.0, min_s: float = 0.5):
        self.horizon_s = horizon_s
        self.min_s = min_s  # no estimate before this much backlog was seen
        self._segments: deque[tuple[float, int]] = deque()  # (backlogged seconds, tokens)
        self._elapsed = 0.0
        self._tokens = 0
        self._num_rounds = 0  # segments in the window in which tokens left (2 to trust it)
        self._last: float | None = None

    @property
    def tokens_per_s(self) -> float:
        """0 = not measured yet (too little backlog, or under 2 admission rounds)."""
        if self._elapsed < self.min_s or self._num_rounds < 2:
            return 0.0
        return self._tokens / self._elapsed

    def observe(self, num_left: int, is_backlogged: bool, now: float | None = None) -> None:
        """After a scheduling round: `num_left` prompt tokens left the queue, which
        was non-empty before it (`is_backlogged`)."""
        now = time.monotonic() if now is None else now
        if self._last is not None and is_backlogged:
            seg = (now - self._last, max(0, num_left))
            self._segments.append(seg)
            self._elapsed += seg[0]
            self._tokens += seg[1]
            self._num_rounds += seg[1] > 0
            while self._segments and self._elapsed - self._segments[0][0] >= self.horizon_s:
                old_s, old_tokens = self._segments.popleft()
                self._elapsed -= old_s
                self._tokens -= old_tokens
                self._num_rounds -= old_tokens > 0
        self._last = now

    def predict_wait(self, tokens_ahead: int) -> float | None:
        """Seconds until `tokens_ahead` prompt tokens are admitted, as a fluid (None:
        no estimate). Admissions come in rounds, as slots free, so the real wait
        runs up to about a round longer: WaitCalibration learns by how much."""
        rate = self.tokens_per_s
        return tokens_ahead / rate if rate else None


class WaitCalibration:
    """How much longer admitted requests really waited than predicted: the largest
    (actual - predicted) over the last `window` requests (`quantile` 1; the goal is
    a p99 within budget), never below 0. Added to every prediction, it covers what the fluid estimate cannot
    see (slots that free in rounds, a step's length, the prefill step)."""

    def __init__(self, window: int = 64, quantile: float = 1.0, min_samples: int = 16):
        self.quantile = quantile
        self.min_samples = min_samples
        self._errors: deque[float] = deque(maxlen=window)
        self._margin_s = 0.0

    def margin_s(self, prior_s: float) -> float:
        """The learnt margin; `prior_s` until `min_samples` were seen (their first
        tokens come a wait later than their admission: the first seconds of an
        overload are judged by the prior)."""
        return self._margin_s if len(self._errors) >= self.min_samples else prior_s

    def record(self, predicted_s: float, actual_s: float) -> None:
        self._errors.append(actual_s - predicted_s)
        ranked = sorted(self._errors)
        self._margin_s = max(0.0, ranked[min(len(ranked) - 1, int(self.quantile * len(ranked)))])
