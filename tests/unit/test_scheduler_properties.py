"""Scheduler invariants, with the real engine and tiny model, under random workloads."""
from hypothesis import HealthCheck, given, settings, strategies as st

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.scheduler.sequence import SeqStatus

request = st.tuples(st.integers(1, 60), st.integers(1, 12), st.integers(1, 3),
                    st.booleans())  # prompt len, max tokens, n, sampled
workload = st.lists(request, min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=workload, num_blocks=st.integers(10, 40), budget=st.integers(4, 64),
       max_seqs=st.integers(1, 6), aborts=st.lists(st.integers(0, 40), max_size=3))
def test_random_workloads_finish_without_leaks(tiny_model, reqs, num_blocks, budget, max_seqs, aborts):
    engine = Engine(tiny_model, EngineConfig(block_size=4, num_kv_blocks=num_blocks,
                                             max_num_batched_tokens=budget, max_num_seqs=max_seqs))
    ids, max_tokens = [], {}
    for i, (plen, mt, n, sampled) in enumerate(reqs):
        params = SamplingParams(max_tokens=mt, n=n, ignore_eos=True, seed=i,
                                temperature=0.8 if sampled else 0.0)
        prompt = [(i * 31 + j) % 3000 for j in range(plen)]
        try:
            ids.append(engine.add_request(prompt, params))
            max_tokens[ids[-1]] = mt
        except Exception as e:  # requests that can never fit are rejected up front
            assert getattr(e, "field", None) == "max_tokens"
    received = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        assert step < 3000, "no progress"
        if step in aborts and ids:
            engine.abort(ids[step % len(ids)])
        plan_tokens_before = engine.stats.num_tokens
        for out in engine.step():
            received.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        # the step respected the budget and the cap
        assert engine.stats.num_tokens - plan_tokens_before <= budget
        assert len(engine.scheduler.running) <= 3 * max_seqs  # n <= 3 forks may exceed the cap
        engine.kv.pool.check_invariants()
        for seq in engine.scheduler.running:
            assert seq.status is SeqStatus.RUNNING
            assert len(engine.kv.tables[seq.seq_id]) * 4 >= seq.num_computed
        for seq in engine.scheduler.waiting:
            assert seq.seq_id not in engine.kv.tables  # waiting sequences hold no blocks
    assert engine.kv.pool.num_used == 0
    assert not engine.scheduler.seqs and not engine.runner.seqs
    for (rid, index), toks in received.items():
        assert len(toks) <= max_tokens[rid]
