"""Arrival processes: when each request of a run is sent.

- `offline`: every request at t = 0.
- `poisson`: exponential gaps at `rate` requests/s.
- `gamma`: gamma gaps with mean 1/rate and shape `burstiness` (1 = Poisson,
  below 1 burstier, above 1 more regular).
- `concurrency`: a fixed number of requests in flight; the next is sent as one
  finishes (the harness drives it; there is no schedule).

A workload's burst window (`{"start_frac", "end_frac", "factor"}`) multiplies the
rate by `factor` for that share of the run. Gaps are drawn at unit rate and
mapped through the integrated rate, so a Poisson process stays exactly Poisson
inside and outside the window.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

KINDS = ("offline", "poisson", "gamma", "concurrency")
MAX_ARRIVALS = 1_000_000


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str = "offline"
    rate: float | None = None  # requests/s (poisson, gamma)
    burstiness: float = 1.0  # gamma shape
    concurrency: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"arrival {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind in ("poisson", "gamma") and not (self.rate and self.rate > 0):
            raise ValueError(f"{self.kind} arrivals need a rate > 0")
        if self.kind == "gamma" and not self.burstiness > 0:
            raise ValueError("burstiness must be > 0")
        if self.kind == "concurrency" and not (self.concurrency and self.concurrency >= 1):
            raise ValueError("concurrency arrivals need a concurrency >= 1")

    @property
    def label(self) -> str:
        if self.kind == "poisson":
            return f"poisson {self.rate:g}/s"
        if self.kind == "gamma":
            return f"gamma {self.rate:g}/s b={self.burstiness:g}"
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency}"
        return "offline"

    def to_dict(self) -> dict:
        return asdict(self)


def schedule(spec: ArrivalSpec, num_requests: int | None, duration_s: float | None,
             seed: int | str = 0, burst: dict | None = None) -> list[float]:
    """Arrival offsets (seconds from the run's start) for offline / poisson / gamma.

    Rate-based arrivals stop at `num_requests` or at `duration_s`, whichever comes
    first (at least one of the two is needed); offline needs `num_requests`.
    """
    if spec.kind == "concurrency":
        raise ValueError("concurrency arrivals have no schedule")
    if spec.kind == "offline":
        if not num_requests:
            raise ValueError("offline arrivals need a number of requests")
        return [0.0] * num_requests
    if num_requests is None and duration_s is None:
        raise ValueError("rate-based arrivals need a number of requests or a duration")
    limit = min(num_requests or MAX_ARRIVALS, MAX_ARRIVALS)
    window = _burst_window(spec.rate, burst, num_requests, duration_s)
    rng = random.Random(f"arrivals/{seed}/{spec.kind}/{spec.rate}/{spec.burstiness}")
    offsets, unit_time = [], 0.0
    while len(offsets) < limit:
        if spec.kind == "poisson":
            unit_time += rng.expovariate(1.0)
        else:
            unit_time += rng.gammavariate(spec.burstiness, 1.0 / spec.burstiness)
        t = _invert(unit_time, spec.rate, window)
        if duration_s is not None and t >= duration_s:
            break
        offsets.append(t)
    return offsets


def _burst_window(rate: float, burst: dict | None, num_requests: int | None,
                  duration_s: float | None) -> tuple[float, float, float] | None:
    """(start_s, end_s, factor) of the spike, placed by the run's expected length."""
    if not burst:
        return None
    start, end, factor = burst["start_frac"], burst["end_frac"], burst["factor"]
    if duration_s is None:  # the length N requests take with the spike included
        duration_s = num_requests / (rate * ((1 - (end - start)) + (end - start) * factor))
    return start * duration_s, end * duration_s, factor


def _invert(unit_time: float, rate: float, window) -> float:
    """The time t at which the integrated rate reaches `unit_time` arrivals."""
    if window is None:
        return unit_time / rate
    start, end, factor = window
    before = start * rate  # arrivals expected before the window
    inside = (end - start) * rate * factor
    if unit_time <= before:
        return unit_time / rate
    if unit_time <= before + inside:
        return start + (unit_time - before) / (rate * factor)
    return end + (unit_time - before - inside) / rate


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rates must be positive numbers: {text!r}")
    return rates
