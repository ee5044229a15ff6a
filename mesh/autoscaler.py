"""A GPU-aware autoscaler: replicas follow the load between min and max.

Every `tick_s` the supervisor reads each serving replica's scheduler stats
(`Signals`) and `AutoscalerPolicy.decide` says how many replicas there should
be, and why. The rules, in order (the first that holds decides):

- out, by 1 (by 2 past the budget), when any priority class's predicted TTFT
  (admission's own prediction for a new request) reaches `ttft_pressure` of its
  budget: before requests are refused or late, not after;
- out, by 1, when a replica's KV usage reaches `kv_high` (allocated blocks,
  waste included: blocks no new request can use are as full as used ones);
- out, by 1, when `target_utilisation` of the slots run while requests wait or
  the arrival rate rises (a fast average of arrivals 25% over a slow one);
- in, by 1, when the mesh has been calm for `scale_in_after_s` (hysteresis):
  slots under `scale_in_utilisation` busy and still under the target with one
  replica fewer, nothing waiting, no TTFT pressure, KV under half, arrivals
  not rising. A removed replica drains (mesh/scaling.py).
While arrivals rise, a scale-out adds as many replicas as the arrival rate grew
(the current count times fast / slow average, up to 4x), not just one. Never
more often than every `cooldown_s`, never outside [min, max]. Every
decision that changes the count is logged with its reason and the signals,
written to `autoscaler.jsonl` in the run directory (`autoscaler-NAME.jsonl` for a
model of `models:` with its own autoscaler), and counted in
`llmesh_autoscaler_decisions_total{action,model,rule}`;
`llmesh_autoscaler_desired_replicas{model}` is what a HorizontalPodAutoscaler can follow.

The policy is a pure function of the signal trace (tests replay recorded ones).
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from llmesh.mesh.config import AutoscalerConfig

log = logging.getLogger("llmesh.autoscaler")

FAST, SLOW = 0.5, 0.1  # per-tick weights of the arrival-rate averages
RISING = 1.25  # the fast average this much over the slow one: arrivals rise


@dataclass(frozen=True)
class Signals:
    """The serving (regular, not draining) replicas at one tick."""

    t: float
    replicas: int
    running: int  # sequences running, summed
    slots: int  # running slots (max_num_seqs), summed
    waiting: int  # sequences queued, summed
    pressure: float  # max over classes with a budget: predicted wait / budget
    kv_usage: float  # the fullest replica's
    kv_waste: float  # mean share of allocated slots holding no token
    prefix_hit_rate: float  # mean
    arrivals: int  # requests that reached the replicas so far (admitted or refused), summed


@dataclass(frozen=True)
class Decision:
    t: float
    current: int
    desired: int
    rule: str  # ttft | kv | load | calm | bounds | hold
    reason: str

    @property
    def action(self) -> str:
        return "out" if self.desired > self.current else "in" if self.desired < self.current \
            else "hold"


class AutoscalerPolicy:
    def __init__(self, cfg: AutoscalerConfig):
        self.cfg = cfg
        self.fast = self.slow = None  # arrival-rate averages (requests / s)
        self._last: tuple[float, int] | None = None  # (t, arrivals) of the previous tick
        self._calm_since: float | None = None
        self._last_change = -math.inf

    def decide(self, s: Signals) -> Decision:
        c = self.cfg
        rising = self._rising(s)
        util = s.running / s.slots if s.slots else 0.0
        current = s.replicas
        if not c.min_replicas <= current <= c.max_replicas:
            return self._change(s, min(c.max_replicas, max(c.min_replicas, current)), "bounds",
                                f"{current} replicas, outside [{c.min_replicas}, {c.max_replicas}]")
        cooling = s.t - self._last_change < c.cooldown_s
        rule, reason, step = None, "", 1
        if s.pressure >= c.ttft_pressure:
            rule, reason = "ttft", f"predicted TTFT at {s.pressure:.0%} of its budget"
            step = 2 if s.pressure >= 1.0 else 1
        elif s.kv_usage >= c.kv_high:
            rule, reason = "kv", (f"KV {s.kv_usage:.0%} used on the fullest replica "
                                  f"({s.kv_waste:.0%} of allocated slots empty)")
        elif util >= c.target_utilisation and (s.waiting or rising):
            rule, reason = "load", (f"{util:.0%} of slots busy, {s.waiting} waiting, arrivals "
                                    f"{self.fast or 0:.1f}/s" + (" and rising" if rising else ""))
        if rule is not None:
            self._calm_since = None
            if rising:  # arrivals jumped: as many more as the rate did (up to 4x)
                step = max(step, math.ceil(current * min(4.0, self.fast / self.slow)) - current)
            if current < c.max_replicas and not cooling:
                return self._change(s, min(c.max_replicas, current + step), rule, reason)
            return Decision(s.t, current, current, "hold", reason + (
                " (cooling down)" if cooling else " (at max_replicas)"))
        fewer_util = s.running / (s.slots * (current - 1) / current) if current > 1 else math.inf
        calm = (util < c.scale_in_utilisation and fewer_util < c.target_utilisation
                and not s.waiting and s.pressure < 0.1 and s.kv_usage < 0.5 and not rising)
        if not calm:
            self._calm_since = None
            return Decision(s.t, current, current, "hold", f"{util:.0%} of slots busy")
        if self._calm_since is None:
            self._calm_since = s.t
        calm_for = s.t - self._calm_since
        if calm_for >= c.scale_in_after_s and current > c.min_replicas and not cooling:
            self._calm_since = s.t  # (the next one waits as long again)
            return self._change(s, current - 1, "calm",
                                f"calm for {calm_for:.0f}s: {util:.0%} of slots busy, "
                                f"{fewer_util:.0%} with one replica fewer")
        return Decision(s.t, current, current, "hold", f"calm for {calm_for:.0f}s")

    def _rising(self, s: Signals) -> bool:
        if self._last is not None and s.t > self._last[0]:
            rate = max(0.0, (s.arrivals - self._last[1]) / (s.t - self._last[0]))
            self.fast = rate if self.fast is None else FAST * rate + (1 - FAST) * self.fast
            self.slow = rate if self.slow is None else SLOW * rate + (1 - SLOW) * self.slow
        self._last = (s.t, s.arrivals)
        return self.fast is not None and self.fast > RISING * self.slow and self.fast > 0.5

    def _change(self, s: Signals, desired: int, rule: str, reason: str) -> Decision:
        self._last_change = s.t
        return Decision(s.t, s.replicas, desired, rule, reason)


class DecisionLog:
    """Every change: a log line, a line of `file` (autoscaler.jsonl; one per model
    where several autoscale), and the metrics (labelled by model)."""

    def __init__(self, run_dir: Path | None, model: str = "default",
                 file: str = "autoscaler.jsonl"):
        self.path = run_dir / file if run_dir else None
        self.model = model
        self.m = _metrics()

    def record(self, d: Decision, s: Signals) -> None:
        model = self.model
        self.m["desired"].labels(model).set(d.desired)
        self.m["replicas"].labels(model).set(s.replicas)
        self.m["pressure"].labels(model).set(s.pressure)
        if d.action == "hold":
            return
        self.m["decisions"].labels(d.action, model, d.rule).inc()
        log.warning("autoscaler (%s): %d -> %d replicas (%s: %s)", model, d.current, d.desired,
                    d.rule, d.reason)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**asdict(d), "action": d.action, "signals": asdict(s)}) + "\n")


@functools.lru_cache(maxsize=1)
def _metrics() -> dict:
    """The autoscaler's metrics, registered once per process."""
    from prometheus_client import Counter, Gauge
    return {"decisions": Counter("llmesh_autoscaler_decisions",
                                 "Autoscaler decisions that changed the replica count",
                                 ["action", "model", "rule"]),
            "desired": Gauge("llmesh_autoscaler_desired_replicas", "Replicas the autoscaler wants",
                             ["model"]),
            "replicas": Gauge("llmesh_autoscaler_replicas", "Replicas serving traffic", ["model"]),
            "pressure": Gauge("llmesh_autoscaler_ttft_pressure",
                              "Highest predicted TTFT / budget over the priority classes",
                              ["model"])}
