"""Priorities, aging, per-tenant fairness, priority preemption, watermark and queue bounds,
on the real scheduler and engine with the tiny model (each control run shows the
policy is what makes the difference)."""
import dataclasses

import pytest

from llmesh.services.common.sampling_params import SamplingParams, ends_in_repetition
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.scheduler.policy import ClassLimits, QueueFullError, SchedulingPolicy
from llmesh.services.scheduler.sequence import FinishReason


def _engine(tiny_model, policy=SchedulingPolicy(), **kw):
    """These runs overload the engine on purpose: SLO admission (its own test) is off."""
    cfg = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64, max_num_seqs=4)
    cfg.update(kw)
    classes = {name: dataclasses.replace(lim, ttft_budget_s=0.0)
               for name, lim in policy.classes.items()}
    return Engine(tiny_model, EngineConfig(policy=dataclasses.replace(policy, classes=classes),
                                           **cfg))


def _params(max_tokens):
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _steps_until_batch_done(tiny_model, policy, limit=240):
    """A steady stream of interactive requests (one per step, more than the engine
    serves) and one batch request: the step at which the batch request finishes."""
    engine = _engine(tiny_model, policy, max_num_seqs=2)
    batch = engine.add_request([7] * 8, _params(6), priority="batch")
    for step in range(1, limit + 1):
        engine.add_request([3 + step % 50] * 8, _params(4), priority="interactive")
        for out in engine.step():
            if out.request_id == batch and out.finish_reason is not None:
                return step
    return None


def test_aging_lets_a_batch_request_finish_under_a_stream_of_interactive_ones(tiny_model):
    policy = SchedulingPolicy(aging_steps=8)
    done_at = _steps_until_batch_done(tiny_model, policy)
    # interactive weight 4, batch 1: it outranks fresh interactive heads after about
    # 3 * 8 steps of waiting, then runs 6 tokens
    assert done_at is not None and done_at <= 120, done_at
    # without aging the same stream starves it for the whole run
    assert _steps_until_batch_done(tiny_model, dataclasses.replace(policy, aging_steps=10**9)) is None


def _share_of_small_tenant(tiny_model, policy):
    """Tenant A sends 10x what B sends, both backlogged, same request shape: B's share
    of the tokens generated until B's last request is admitted."""
    engine = _engine(tiny_model, policy, max_num_seqs=4)
    owner = {}
    for i in range(110):  # interleaved as they would arrive: ten of A's per one of B's
        tenant = "b" if i % 11 == 10 else "a"
        owner[engine.add_request([11 + i % 7] * 8, _params(8), tenant=tenant)] = tenant
    served = {"a": 0, "b": 0}
    for _ in range(2000):
        for out in engine.step():
            served[owner[out.request_id]] += len(out.new_token_ids)
        if not any(s.tenant == "b" for s in engine.scheduler.waiting):
            break
    return served["b"] / (served["a"] + served["b"])


def test_two_tenants_get_equal_token_shares_whatever_they_send(tiny_model):
    share = _share_of_small_tenant(tiny_model, SchedulingPolicy())
    assert 0.4 <= share <= 0.6, share  # within 20% of an equal share
    # FCFS gives the heavy tenant what it sends
    assert _share_of_small_tenant(tiny_model, SchedulingPolicy(priorities=False)) < 0.2


def _interactive_wait(tiny_model, policy):
    """KV full of growing batch requests; one interactive arrives. Returns the steps
    until its first token and the preemption counts by class."""
    engine = _engine(tiny_model, policy, num_kv_blocks=24, max_num_batched_tokens=32)
    batch = [engine.add_request([20 + i] * 24, _params(60), priority="batch") for i in range(2)]
    for _ in range(20):  # the batch requests are running and hold 22 of the 24 blocks
        engine.step()
    seqs = dict(engine.scheduler.seqs)
    urgent = engine.add_request([9] * 12, _params(4), priority="interactive")
    seqs[urgent] = engine.scheduler.seqs[urgent]
    for step in range(1, 200):
        if any(o.request_id == urgent and o.new_token_ids for o in engine.step()):
            break
    while engine.has_unfinished():
        engine.step()
    engine.kv.pool.check_invariants()
    assert engine.kv.pool.num_used == 0
    return step, seqs[urgent].num_preemptions, sum(seqs[b].num_preemptions for b in batch)


def test_interactive_requests_preempt_batch_ones_when_memory_is_short(tiny_model):
    wait, urgent_preempted, batch_preempted = _interactive_wait(tiny_model, SchedulingPolicy())
    assert wait <= 2 and urgent_preempted == 0 and batch_preempted >= 1
    # without priorities it waits for a batch request to finish or be squeezed out
    wait_fcfs, _, _ = _interactive_wait(tiny_model, SchedulingPolicy(priorities=False))
    assert wait_fcfs > wait + 5, (wait_fcfs, wait)


def test_blocks_running_out_preempt_batch_before_interactive(tiny_model):
    engine = _engine(tiny_model, SchedulingPolicy(kv_watermark=0.0), num_kv_blocks=20,
                     max_num_batched_tokens=64)
    ids = {engine.add_request([30 + i] * 8, _params(30), priority=p): p
           for i, p in enumerate(["interactive", "batch", "interactive", "batch"])}
    seqs = {rid: engine.scheduler.seqs[rid] for rid in ids}
    while engine.has_unfinished():
        engine.step()
    preempted = {p: sum(seqs[r].num_preemptions for r, q in ids.items() if q == p)
                 for p in ("interactive", "batch")}
    assert preempted["batch"] >= 1 and preempted["interactive"] == 0, preempted


def test_new_requests_leave_the_watermark_free(tiny_model):
    policy = SchedulingPolicy(kv_watermark=0.25)  # 5 of 20 blocks
    engine = _engine(tiny_model, policy, num_kv_blocks=20)
    engine.add_request([5] * 40, _params(8))  # 10 blocks, admitted while idle
    engine.step()
    second = engine.add_request([6] * 24, _params(2))  # 6 more would leave 4 < 5 free
    engine.step()
    assert any(s.request_id == second for s in engine.scheduler.waiting)
    engine.scheduler.policy = dataclasses.replace(policy, kv_watermark=0.0)
    engine.step()
    assert not any(s.request_id == second for s in engine.scheduler.waiting)


def test_queue_bounds_refuse_at_once_and_change_nothing(tiny_model):
    classes = dict(SchedulingPolicy().classes)
    classes["batch"] = ClassLimits(weight=1.0, max_queued_requests=2, max_queued_tokens=100)
    engine = _engine(tiny_model, SchedulingPolicy(classes=classes))
    engine.add_request([1] * 10, _params(2), priority="batch")
    engine.add_request([2] * 10, _params(2), priority="batch")
    with pytest.raises(QueueFullError) as info:
        engine.add_request([3] * 10, _params(2), priority="batch")
    assert info.value.code == "RESOURCE_EXHAUSTED" and "2 requests" in str(info.value)
    assert len(engine.scheduler.waiting) == 2 and len(engine.scheduler.seqs) == 2
    engine.add_request([4] * 10, _params(2), priority="interactive")  # other classes unaffected
    engine.step()  # admitted: room again
    engine.add_request([5] * 10, _params(2), priority="batch")
    with pytest.raises(QueueFullError, match="100 prompt tokens"):
        engine.add_request([6] * 95, _params(2), priority="batch")


def test_repetition_detection():
    assert ends_in_repetition([1, 2, 3, 3, 3, 3], 1, 4)
    assert not ends_in_repetition([1, 2, 3, 3, 3], 1, 4)
    assert ends_in_repetition([9, 1, 2, 1, 2, 1, 2], 2, 3)
    assert not ends_in_repetition([9, 1, 2, 1, 2, 1, 3], 4, 3)
    assert ends_in_repetition([5, 1, 2, 3, 1, 2, 3], 3, 2)
    assert not ends_in_repetition([1, 1, 1, 1], 0, 4)  # off


def test_repetition_stop_ends_a_looping_generation_early(tiny_model):
    engine = _engine(tiny_model)
    # a repetition penalty below 1 rewards seen tokens: the model falls into a loop
    looping = SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=0.1)
    tokens = engine.generate([[4, 5, 6, 7]], looping)[0][0].token_ids
    assert len(tokens) == 40 and ends_in_repetition(tokens, 4, 3)
    params = looping.replace(repetition_max_ngram=4, repetition_min_repeats=3)
    out = engine.generate([[4, 5, 6, 7]], params)[0][0]
    assert out.finish_reason == FinishReason.STOP.value and len(out.token_ids) < 40
    assert out.token_ids == tokens[:len(out.token_ids)]  # the same tokens, cut at the loop
    assert ends_in_repetition(out.token_ids, 4, 3)
    assert not any(ends_in_repetition(out.token_ids[:i], 4, 3) for i in range(len(out.token_ids)))


def test_aborting_waiting_requests_keeps_scheduling(tiny_model):
    engine = _engine(tiny_model, max_num_seqs=1)
    first = engine.add_request([1] * 8, _params(3), tenant="a")
    engine.step()
    waiting = [engine.add_request([2 + i] * 8, _params(3), tenant=t, priority=p)
               for i, (t, p) in enumerate([("a", "batch"), ("b", "batch"), ("b", "interactive"),
                                           ("a", "batch")])]
    engine.abort(waiting[1])  # alone in its queue
    engine.abort(waiting[3])  # the tail of a queue
    assert engine.scheduler.waiting.depth == {"interactive": 1, "standard": 0, "batch": 1}
    done = []
    while engine.has_unfinished():
        done += [o.request_id for o in engine.step() if o.finish_reason is not None]
    # the interactive one takes the only running slot from the standard one (preempted)
    assert done == [waiting[2], first, waiting[0]], [([first] + waiting).index(d) for d in done]
    assert engine.kv.pool.num_used == 0
