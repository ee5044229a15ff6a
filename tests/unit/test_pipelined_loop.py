"""Pipelined scheduling (the next step planned while the current one runs) gives
exactly the tokens and text of the serial loop, across preemption, aborts and
deadlines mid-flight, stop strings, n > 1, priority preemption and prefix hits
(hypothesis)."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llmesh.services.common.finish_reason import FinishReason
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.engine.engine import Engine, EngineConfig
from engine_runs import run_arrivals

SYSTEM = [0] + [(7 * j) % 2900 + 5 for j in range(24)]  # a shared prefix: prefix-cache hits
STOPS = ["e", "a ", "th", "in"]  # common in the tiny model's gibberish, so stops happen

request = st.fixed_dictionaries({
    "tail": st.integers(1, 40), "shared": st.booleans(), "max_tokens": st.integers(1, 14),
    "n": st.sampled_from([1, 1, 2]), "sampled": st.booleans(),
    "stop": st.sampled_from([(), (), (STOPS[0],), (STOPS[1], STOPS[2]), (STOPS[3],)]),
    "arrive": st.integers(0, 6), "cut": st.sampled_from([None, None, None, 1, 2, 3, 5, 8]),
    "cut_reason": st.sampled_from([FinishReason.ABORT, FinishReason.DEADLINE]),
    "priority": st.sampled_from(["standard", "batch", "interactive"]),  # priority preemption
})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return TextTokenizer(tiny_model_dir)


def _prompt(i, r):
    tail = [(i * 131 + j * 17) % 2900 + 5 for j in range(r["tail"])]
    return (SYSTEM if r["shared"] else [0]) + tail


def _params(i, r):
    return SamplingParams(max_tokens=r["max_tokens"], n=r["n"], seed=1000 + i,
                          temperature=0.9 if r["sampled"] else 0.0, top_p=0.95,
                          stop=r["stop"], ignore_eos=(i % 3 != 0))


def _run(model, tokenizer, reqs, depth, cfg, events=True):
    """Requests arrive at their step; `cut` ends one after that many of its steps
    (as a cancel or a deadline would). Returns per (request, index): tokens, text,
    finish reason; and checks nothing leaked."""
    engine = Engine(model, EngineConfig(pipeline_depth=depth, **cfg), tokenizer)

    def cut(step, out):
        for i, r in enumerate(reqs):
            if events and r["cut"] is not None and r["arrive"] < step \
                    and step == r["arrive"] + r["cut"]:
                for o in engine.loop.cancel(f"r{i}", r["cut_reason"]):
                    out.setdefault((i, o.index), [[], "", None, []])[2] = o.finish_reason
    out = run_arrivals(engine, reqs, _prompt, _params, cut)
    return {key: rec[:3] for key, rec in out.items()}, engine.scheduler.num_preemptions


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(reqs=st.lists(request, min_size=1, max_size=7),
       kv=st.sampled_from([dict(block_size=4, num_kv_blocks=22, max_num_batched_tokens=24),
                           dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=16),
                           dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=64,
                                max_num_seqs=3)]))
def test_pipelined_equals_serial(tiny_model, tokenizer, reqs, kv):
    reqs = [r for r in reqs if len(_prompt(0, r)) + r["max_tokens"] <= kv["num_kv_blocks"]
            * kv["block_size"]]
    if not reqs:
        return
    reference, _ = _run(tiny_model, tokenizer, reqs, 1, dict(num_kv_blocks=512), events=False)
    for depth in (1, 2):
        got, _ = _run(tiny_model, tokenizer, reqs, depth, kv)
        for (i, index), (tokens, text, reason) in got.items():
            ref_tokens, ref_text, ref_reason = reference[(i, index)]
            if reason in (FinishReason.ABORT, FinishReason.DEADLINE):
                # cut mid-flight: what it did produce is the start of the full answer
                assert tokens == ref_tokens[:len(tokens)], (depth, i, index)
                assert ref_text.startswith(text), (depth, i, index)
                continue
            assert (tokens, text, reason) == (ref_tokens, ref_text, ref_reason), (depth, i, index)
        uncut = {i for i, r in enumerate(reqs) if r["cut"] is None}
        assert {k for k in reference if k[0] in uncut} <= set(got)


def test_the_pipelined_engine_plans_ahead_and_wastes_no_step_on_length(tiny_model, tokenizer):
    """A sequence ending by length is never planned past its end; with a stop it costs
    one step (the one planned before its result said stop)."""
    prompts = [[0, 5, 6, 7]]
    engine = Engine(tiny_model, EngineConfig(pipeline_depth=2), tokenizer)
    engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert engine.stats.num_steps == 5
    ref = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))[0][0]
    stop = ref.text[len(ref.text) // 2:][:2]
    got = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True,
                                                  stop=(stop,)))[0][0]
    assert got.finish_reason == "stop" and stop not in got.text
    assert ref.text.startswith(got.text)
    assert not engine.runner.seqs and engine.kv.pool.num_used == 0


@pytest.mark.parametrize("n,max_tokens", [(2, 4), (3, 3), (2, 9)])
def test_every_sequence_reaches_its_owner(tiny_model, n, max_tokens):
    """What the scheduler service streams (`emit`) holds every sequence of an n > 1
    request to its end, also when several finish in the same step (the request's
    track must outlive all of their outputs)."""
    import asyncio
    from llmesh.services.engine.engine import InProcessExecutor
    from llmesh.services.executor.runner import ModelRunner
    from llmesh.services.scheduler.kv_manager import KVCacheManager
    from llmesh.services.scheduler.loop import EngineLoop
    from llmesh.services.scheduler.scheduler import Scheduler, SchedulerConfig
    params = SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0, seed=5, ignore_eos=True)
    prompt = [1, 50, 60, 70]
    expected = [c.token_ids for c in Engine(tiny_model).generate([prompt], params)[0]]
    kv = KVCacheManager(64, 16, True)
    sched = Scheduler(SchedulerConfig(max_model_len=256, max_num_batched_tokens=512,
                                      max_num_seqs=16, eos_token_ids=()), kv)
    executor = InProcessExecutor(ModelRunner(tiny_model, 64, 16))
    got: dict[int, list[int]] = {}
    finished: list[int] = []

    def emit(owner, items):
        for out, info in items:
            got.setdefault(out.index, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                assert info is not None
                finished.append(out.index)
    loop = EngineLoop(sched, executor, tiny_model.config.vocab_size, emit=emit)

    async def run():
        loop.add("r", prompt, params.replace(seed=5), "router-0")
        while loop.has_work:
            await loop.step()
    try:
        asyncio.run(run())
    finally:
        executor.close()
    assert sorted(finished) == list(range(n))
    assert [got[i] for i in range(n)] == expected
    assert not loop.tracks


def test_a_step_lane_stops_whether_or_not_a_plan_is_queued():
    """A lane told to stop exits, and says so, whether the stop arrives while a
    step runs (it then finds the stop when it looks for a queued plan before
    posting) or while it waits for a plan; what it ran is posted in order, each
    next plan prepared before the one before is posted."""
    import threading
    import time

    from llmesh.services.common.step_plan import StepPlan, StepResult
    from llmesh.services.executor.step_lane import StepLane

    class Runner:
        def __init__(self):
            self.log, self.running, self.release = [], threading.Event(), threading.Event()

        def prepare(self, plan):
            self.log.append(("prepare", plan.step_id))
            return plan

        def finish(self, plan):
            self.running.set()
            assert self.release.wait(5)
            self.log.append(("finish", plan.step_id))
            return StepResult(step_id=plan.step_id)

        def reset(self):
            pass

    for stop_while_running in (True, False):
        runner, posted, done = Runner(), [], threading.Event()

        def post(plan, outcome):
            if plan is None:
                done.set()
            else:
                posted.append((plan.step_id, outcome.step_id))
                runner.log.append(("post", plan.step_id))
        lane = StepLane(runner, post)
        if stop_while_running:
            lane.submit(StepPlan(step_id=1))
            assert runner.running.wait(5)
            lane.stop()  # (queued while step 1 runs)
            runner.release.set()
            expected = [(1, 1)]
        else:
            lane.submit(StepPlan(step_id=1))
            lane.submit(StepPlan(step_id=2))
            runner.release.set()
            deadline = time.monotonic() + 5
            while len(posted) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            lane.stop()  # (the lane waits for a plan)
            expected = [(1, 1), (2, 2)]
        assert done.wait(5), "the lane did not stop"
        lane.join(5)
        assert posted == expected
        if not stop_while_running:
            assert runner.log.index(("prepare", 2)) < runner.log.index(("post", 1))
