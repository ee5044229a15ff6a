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

import heapq
import time
from collections import deque
from typing import TYPE_CHECKING

from llmesh.services.scheduler.policy import QueueFullError

if TYPE_CHECKING:
    from llmesh.services.scheduler.scheduler import Scheduler

# admission aims at this share of a class's TTFT budget: the rest is headroom for
# what no prediction sees (a pause of the host, a burst of other work)
SLO_HEADROOM = 0.9
REFUSING_EVERY_S = 0.05


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


class WaitPredictor:
    """The replica's measured rates and what they predict: the wait for a first
    token (SLO admission refuses what would pass its class's budget), the retry
    pushback of a refused request, and a step's expected length. The engine loop
    feeds it (`observe_round`, `observe_step`, `calibration.record`)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.token_rate = 0.0  # tokens per second computed, smoothed
        self.step_s = 0.0  # wall time per step, smoothed
        self.drain = DrainRate()  # the queue's drain rate under backlog ...
        self.calibration = WaitCalibration()  # ... and how far off its waits were
        self._left_waiting = False  # the last scheduling round left requests queued
        self._late: dict[str, float] = {}  # (classes `refusing` last found late, and when)
        self._refusing_at = -1e9

    def observe_round(self, num_left: int) -> None:
        """After a scheduling round that took `num_left` prompt tokens off the queue:
        capacity shows only while requests are left waiting, so what leaves after a
        round that left some behind left as fast as the replica could take it."""
        self.drain.observe(num_left, self._left_waiting)
        self._left_waiting = bool(self.scheduler.waiting)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        rate = num_tokens / seconds
        self.token_rate = rate if not self.token_rate else 0.9 * self.token_rate + 0.1 * rate
        self.step_s = seconds if not self.step_s else 0.9 * self.step_s + 0.1 * seconds

    def pushback_s(self, priority: str) -> float:
        """Retry after about the time the class's queued prompt tokens take."""
        queued = self.scheduler.waiting.queued_tokens.get(priority, 0)
        return min(30.0, max(0.05, queued / self.token_rate if self.token_rate else 1.0))

    def check_budget(self, priority: str, num_tokens: int, spent_s: float = 0.0
                     ) -> float | None:
        """Refuse now (QueueFullError, reason "slo") what would wait in the queue past
        its class's TTFT budget, less `spent_s` already spent on the way here; the
        uncorrected prediction for what is admitted (None: no estimate).

        The wait is `predict_wait`, plus the margin by which recent predictions
        fell short of the real time to first token (WaitCalibration)."""
        budget = self.scheduler.waiting.policy.limits(priority).ttft_budget_s
        if not budget:
            return None
        wait = self.predict_wait(priority, num_tokens)
        # (no estimate yet: what it already spent on the way)
        margin = self.calibration.margin_s(prior_s=self.step_s) if wait is not None else 0.0
        late = spent_s + (wait or 0.0) + margin
        if late > SLO_HEADROOM * budget:
            raise QueueFullError(priority, f"predicted time to first token {late:.1f}s ({spent_s:.1f}s "
                                 f"of it before this replica) > the class's {budget:g}s "
                                 f"TTFT budget",
                                 retry_after_s=min(60.0, max(0.05, late - budget)),
                                 reason="slo")
        return wait  # (uncorrected: the calibration learns from it)

    def refusing(self, classes, now: float | None = None) -> dict[str, tuple[str, float]]:
        """The classes a new request of which would be refused now whatever its
        prompt and however early it came, each with the reason and a retry hint:
        its queue full (looked at on every call: it changes from step to step), or
        the predicted wait with the calibration's margin past the budget's headroom
        (worked out at most every `REFUSING_EVERY_S`: it rides on every load report)."""
        now = time.monotonic() if now is None else now
        if now - self._refusing_at >= REFUSING_EVERY_S:
            self._late, self._refusing_at = {}, now
            for cls in classes:
                budget = self.scheduler.waiting.policy.limits(cls).ttft_budget_s
                wait = self.predict_wait(cls) if budget else None
                if wait is None:
                    continue
                late = wait + self.calibration.margin_s(prior_s=self.step_s)
                if late > SLO_HEADROOM * budget:
                    self._late[cls] = min(60.0, max(0.05, late - budget))
        out = {cls: ("slo", hint) for cls, hint in self._late.items()}
        for cls in classes:
            try:
                self.scheduler.waiting.check_room(cls, 0)
            except QueueFullError:
                out[cls] = ("queue_full", self.pushback_s(cls))
        return out

    def predict_wait(self, priority: str, num_tokens: int = 0) -> float | None:
        """How long a new request of `priority` with `num_tokens` would wait for its
        first token now, uncorrected (None: no estimate yet). What is queued ahead
        (its class and those above) over the measured drain rate; before that rate
        is known, their prompts at the token rate plus the slots played forward;
        with nothing queued, the wait for a slot if every one is taken."""
        waiting = self.scheduler.waiting
        if waiting:
            prompt_ahead, decode_ahead = waiting.tokens_ahead(priority)
            wait = self.drain.predict_wait(prompt_ahead + num_tokens)
            if wait is None and self.token_rate and self.step_s:
                wait = prompt_ahead / self.token_rate + self._slot_wait(priority, decode_ahead)
            return wait
        return self._slot_wait(priority, 0) if self.step_s else None

    def _slot_wait(self, priority: str, decode_ahead: int) -> float:
        """When a slot frees for a new request of `priority`: the running requests
        hold theirs for the rest of their `max_tokens` (a ceiling: EOS ends some
        sooner), each request queued ahead takes the first slot to free for its
        share of `decode_ahead`, and the new one the next (at the measured step time)."""
        waiting = self.scheduler.waiting
        weight = waiting.policy.weight(priority)
        num_ahead = sum(n for c, n in waiting.depth.items() if waiting.policy.weight(c) >= weight)
        slots = [max(0, s.params.max_tokens - len(s.output_token_ids))
                 for s in self.scheduler.running]
        slots += [0] * max(0, self.scheduler.config.max_num_seqs - len(slots))
        heapq.heapify(slots)
        each = decode_ahead / num_ahead if num_ahead else 0.0
        for _ in range(min(num_ahead, 4096)):
            heapq.heappush(slots, heapq.heappop(slots) + each)
        return slots[0] * self.step_s
