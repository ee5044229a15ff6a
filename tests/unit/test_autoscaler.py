"""The autoscaler's policy on signal traces: it scales out before saturation
(TTFT pressure, KV, busy slots with rising arrivals), scales in only after a
calm spell (hysteresis), stays within its bounds, waits out its cooldown, and
never flaps on a noisy steady load."""
import random

import pytest

from llmesh.mesh.autoscaler import AutoscalerPolicy, Signals
from llmesh.mesh.config import AutoscalerConfig

CFG = AutoscalerConfig(enabled=True, min_replicas=1, max_replicas=4, scale_in_after_s=10,
                       cooldown_s=3)
SLOTS = 8  # per replica


def _sig(t, replicas, running, waiting=0, pressure=0.0, kv=0.1, arrivals=0):
    return Signals(t=t, replicas=replicas, running=running, slots=SLOTS * replicas,
                   waiting=waiting, pressure=pressure, kv_usage=kv, kv_waste=0.05,
                   prefix_hit_rate=0.4, arrivals=arrivals)


def _replay(trace, cfg=CFG):
    """Feed a trace of (running per replica, waiting, pressure, kv, arrival rate)
    per 1 s tick, the replica count following the decisions; the decisions."""
    policy, replicas, arrivals, out = AutoscalerPolicy(cfg), 1, 0, []
    for t, (busy, waiting, pressure, kv, rate) in enumerate(trace):
        arrivals += rate
        d = policy.decide(_sig(float(t), replicas, min(SLOTS * replicas, round(busy * replicas)),
                               waiting, pressure, kv, arrivals))
        out.append(d)
        replicas = d.desired
    return out


def test_a_spike_scales_out_before_requests_wait_past_half_their_budget():
    # calm, then arrivals jump and the slots fill; TTFT pressure builds only later
    trace = [(2, 0, 0.0, 0.1, 2)] * 5 + [(7, 0, 0.0, 0.3, 12)] * 3 + \
        [(8, 6, 0.6, 0.5, 12)] * 6
    decisions = _replay(trace)
    first_out = next(d for d in decisions if d.action == "out")
    assert first_out.rule == "load" and first_out.t == 5  # busy slots + rising arrivals
    # arrivals went from 2/s to 12/s: the averages say 2.3x, so 1 replica becomes 3
    assert first_out.desired == 3
    assert all(d.t >= 5 for d in decisions if d.action == "out")


def test_ttft_pressure_and_kv_scale_out_and_past_the_budget_by_two():
    d = AutoscalerPolicy(CFG).decide(_sig(0.0, 2, 4, pressure=0.5))
    assert (d.action, d.rule, d.desired) == ("out", "ttft", 3)
    d = AutoscalerPolicy(CFG).decide(_sig(0.0, 2, 4, pressure=1.3))
    assert d.desired == 4
    d = AutoscalerPolicy(CFG).decide(_sig(0.0, 2, 4, kv=0.9))
    assert (d.action, d.rule) == ("out", "kv") and "KV 90%" in d.reason


def test_bounds_and_cooldown():
    policy = AutoscalerPolicy(CFG)
    assert policy.decide(_sig(0.0, 4, 32, waiting=9, pressure=2.0)).action == "hold"  # at max
    assert policy.decide(_sig(1.0, 6, 8)).desired == 4  # outside the bounds
    policy = AutoscalerPolicy(CFG)
    assert policy.decide(_sig(0.0, 1, 8, pressure=0.9)).desired == 2
    held = policy.decide(_sig(1.0, 2, 8, pressure=0.9))
    assert held.action == "hold" and "cooling down" in held.reason
    assert policy.decide(_sig(3.0, 2, 8, pressure=0.9)).desired == 3


def test_scale_in_waits_for_a_calm_spell_and_goes_one_at_a_time():
    trace = [(8, 4, 0.8, 0.4, 10)] * 12 + [(1, 0, 0.0, 0.05, 1)] * 40
    decisions = _replay(trace)
    outs = [d for d in decisions if d.action == "out"]
    ins = [d for d in decisions if d.action == "in"]
    assert outs and ins and all(d.desired == d.current - 1 for d in ins)
    assert ins[0].t >= 12 + CFG.scale_in_after_s  # calm since t = 12, held 10 s
    assert all(b.t - a.t >= CFG.scale_in_after_s for a, b in zip(ins, ins[1:]))
    assert decisions[-1].desired == 1 and "calm" in ins[0].reason


def test_no_scale_in_when_one_replica_fewer_would_be_busy():
    # 25% busy on 4 replicas is 33% on 3: under scale_in_utilisation it is not
    policy = AutoscalerPolicy(AutoscalerConfig(enabled=True, scale_in_after_s=0, cooldown_s=0,
                                               scale_in_utilisation=0.3,
                                               target_utilisation=0.3))
    assert policy.decide(_sig(0.0, 4, 8)).action == "hold"


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_steady_load_does_not_flap(seed):
    rng = random.Random(seed)
    trace = [(rng.uniform(3, 5), 0, rng.uniform(0, 0.2), 0.3, rng.randint(4, 6))
             for _ in range(120)]
    changes = [d for d in _replay(trace) if d.action != "hold"]
    assert len(changes) <= 1 and all(d.action == "out" for d in changes)


def _recorded():
    """Signals recorded by `python -m llmesh.benchmarks.autoscale` (autoscaler-warm: one
    sleeping-model replica, base 3 req/s, then 30 req/s), every 0.5 s tick."""
    import json
    from pathlib import Path
    path = Path(__file__).parents[1] / "fixtures" / "autoscaler" / "spike-signals.jsonl"
    return [Signals(**json.loads(line)) for line in path.read_text().splitlines()]


def test_on_a_recorded_spike_it_scales_out_at_the_first_tick_of_the_spike():
    trace = _recorded()
    cfg = AutoscalerConfig(enabled=True, min_replicas=1, max_replicas=4, tick_s=0.5,
                           cooldown_s=1.5, scale_in_after_s=10)
    one, two = AutoscalerPolicy(cfg), AutoscalerPolicy(cfg)
    first = [one.decide(s) for s in trace]
    again = [two.decide(s) for s in trace]
    assert first == again  # a pure function of the trace
    spike = next(i for i, (a, b) in enumerate(zip(trace, trace[1:]), 1)
                 if b.arrivals - a.arrivals > 10)  # arrivals jump 10x
    outs = [i for i, d in enumerate(first) if d.action == "out"]
    assert outs[0] == spike, (outs, spike)
    assert first[spike].desired >= 3  # as many as the arrival rate says, not one by one
    assert not any(d.action == "in" for d in first[:spike + 10])
