"""The same request gives the same tokens however the engine runs it."""
import random

import pytest
import torch

from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=50,
                        seed=1234)


def _prompts(n=10, seed=0, lo=3, hi=120):
    rng = random.Random(seed)
    return [[0] + rng.choices(range(5, 3000), k=rng.randint(lo, hi)) for _ in range(n)]


def _run(model, prompts, params, **cfg):
    engine = Engine(model, EngineConfig(**cfg))
    out = [r[0].token_ids for r in engine.generate(prompts, params)]
    assert engine.kv.pool.num_used == 0  # nothing leaked
    assert not engine.runner.seqs and not engine.scheduler.seqs
    engine.kv.pool.check_invariants()
    return out, engine


@pytest.fixture(scope="module")
def baseline(tiny_model):
    prompts = _prompts()
    seeded = [SEEDED.replace(seed=SEEDED.seed + i) for i in range(len(prompts))]
    # one request at a time, whole prompt in one step, no prefix cache
    kw = dict(max_num_seqs=1, max_num_batched_tokens=2048, enable_prefix_caching=False)
    greedy = [_run(tiny_model, [p], GREEDY, **kw)[0][0] for p in prompts]
    sampled = [_run(tiny_model, [p], s, **kw)[0][0] for p, s in zip(prompts, seeded)]
    return prompts, seeded, greedy, sampled


@pytest.mark.parametrize("cfg", [
    dict(max_num_batched_tokens=2048),  # unchunked, batched
    dict(max_num_batched_tokens=16),  # chunked prefill
    dict(max_num_batched_tokens=7, block_size=4),  # chunks not aligned to blocks
    dict(max_num_seqs=3, max_num_batched_tokens=64),  # other batch compositions
    dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=64),  # preemption forced
], ids=["unchunked", "chunked16", "chunked7", "maxseqs3", "preempt"])
def test_same_tokens_any_schedule(tiny_model, baseline, cfg):
    prompts, seeded, greedy, sampled = baseline
    out, engine = _run(tiny_model, prompts, GREEDY, **cfg)
    assert out == greedy
    out, engine = _run(tiny_model, prompts, seeded, **cfg)
    assert out == sampled
    if "num_kv_blocks" in cfg:
        assert engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_do_not_change_tokens(tiny_model, baseline):
    prompts, seeded, greedy, sampled = baseline
    system = _prompts(1, seed=9, lo=70, hi=70)[0]
    shared = [system + p[1:] for p in prompts]
    ref = _run(tiny_model, shared, GREEDY, enable_prefix_caching=False)[0]
    engine = Engine(tiny_model, EngineConfig(max_num_batched_tokens=128))
    first = [r[0].token_ids for r in engine.generate(shared[:1], GREEDY)]
    rest = engine.generate(shared[1:], GREEDY)
    assert first + [r[0].token_ids for r in rest] == ref
    assert all(r[0].num_cached_tokens >= 64 for r in rest)  # 4+ blocks of the system prompt hit
    assert engine.kv_stats().prefix_hit_rate > 0.3
    # a repeated request hits its own earlier blocks, seeded sampling unchanged
    again = engine.generate(prompts[:3], seeded[:3])
    again2 = engine.generate(prompts[:3], seeded[:3])
    assert [r[0].token_ids for r in again2] == [r[0].token_ids for r in again] == sampled[:3]
    assert all(r[0].num_cached_tokens > 0 for r in again2 if len(r[0].prompt_token_ids) > 17)


def test_parallel_sampling_n_shares_prompt_blocks(tiny_model):
    prompt = _prompts(1, seed=3, lo=40, hi=40)[0]  # 41 tokens: a partly filled last block
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=77, n=4)
    engine = Engine(tiny_model, EngineConfig(block_size=16))
    engine.add_request(prompt, params, request_id="r")
    tokens = {i: [] for i in range(4)}
    for out in engine.step():  # prefill + fork
        tokens[out.index].extend(out.new_token_ids)
    # 4 sequences; the 3 prompt blocks are shared, not duplicated
    assert len(engine.scheduler.running) == 4
    assert engine.kv.pool.num_used == 3
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.index].extend(out.new_token_ids)
    # copy-on-write happened: the shared partial block was copied, full ones stayed shared
    outs = [tokens[i] for i in range(4)]
    assert len({tuple(t) for t in outs}) == 4  # different samples per sequence
    assert engine.kv.pool.num_used == 0
    # the same request computed without any sharing (each sequence preempted and
    # recomputed on private blocks) gives the same tokens
    small = Engine(tiny_model, EngineConfig(block_size=16, num_kv_blocks=5))
    res = small.generate([prompt], params)[0]
    assert small.scheduler.num_preemptions > 0
    assert [c.token_ids for c in res] == outs
    # index 0 is the n=1 request with the same seed
    single = Engine(tiny_model).generate([prompt], params.replace(n=1))[0][0]
    assert single.token_ids == outs[0]


def test_abort_frees_blocks_at_any_time(tiny_model):
    engine = Engine(tiny_model, EngineConfig(max_num_batched_tokens=32))
    ids = [engine.add_request(p, GREEDY) for p in _prompts(6)]
    for step in range(5):
        engine.step()
    engine.abort(ids[0])  # running
    engine.abort(ids[-1])  # probably still waiting
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.num_used == 0
    assert not engine.scheduler.seqs and not engine.runner.seqs  # no state left anywhere


def test_stop_conditions(tiny_model):
    engine = Engine(tiny_model)
    prompt = _prompts(1)[0]
    free = engine.generate([prompt], GREEDY)[0][0].token_ids
    stop_at = free[5]
    out = engine.generate([prompt], GREEDY.replace(stop_token_ids=(stop_at,)))[0][0]
    assert out.token_ids == free[:free.index(stop_at) + 1] and out.finish_reason == "stop"
    out = engine.generate([prompt], GREEDY.replace(max_tokens=3))[0][0]
    assert out.token_ids == free[:3] and out.finish_reason == "length"
    # EOS ends generation unless ignore_eos
    eos_model_engine = Engine(tiny_model)
    eos_model_engine.scheduler.config = eos_model_engine.scheduler.config.__class__(
        **{**eos_model_engine.scheduler.config.__dict__, "eos_token_ids": (free[2],)})
    out = eos_model_engine.generate([prompt], GREEDY.replace(ignore_eos=False))[0][0]
    assert out.token_ids == free[:free.index(free[2]) + 1] and out.finish_reason == "stop"
    out = eos_model_engine.generate([prompt], GREEDY)[0][0]
    assert out.token_ids == free


def test_logprobs(tiny_model):
    engine = Engine(tiny_model)
    prompt = _prompts(1)[0]
    out = engine.generate([prompt], GREEDY.replace(max_tokens=4, logprobs=3))[0][0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.top_ids[0] == token  # greedy: the top one
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True) and len(lp.top_ids) == 3
        assert lp.logprob == pytest.approx(lp.top_logprobs[0]) and lp.logprob <= 0
    # the reported distribution is the model's: matches a teacher-forced forward
    from llmesh.services.executor.attention import SeqSlice, TorchPagedAttention, build_metadata
    c = tiny_model.config
    seq = prompt + out.token_ids[:1]
    caches = [(torch.zeros(8, 16, c.num_kv_heads, c.head_dim),
               torch.zeros(8, 16, c.num_kv_heads, c.head_dim)) for _ in range(c.num_layers)]
    meta = build_metadata([SeqSlice(0, len(seq), list(range(8)))], 16, None, torch.device("cpu"))
    with torch.inference_mode():
        logits = tiny_model.compute_logits(tiny_model(torch.tensor(seq), torch.arange(len(seq)),
                                                      caches, meta, TorchPagedAttention()))
    expect = torch.log_softmax(logits[-1], -1)[out.token_ids[1]].item()
    assert out.logprobs[1].logprob == pytest.approx(expect, abs=1e-4)


def test_offline_generate_is_never_refused_and_serving_still_is(tiny_model, baseline):
    """A class that admits 2 queued requests and budgets 1 ms to the first token:
    `generate` (offline) still answers every prompt, the same as one at a time; a
    served request past the bound or the budget is refused."""
    from llmesh.services.scheduler.policy import ClassLimits, QueueFullError, SchedulingPolicy
    tight = ClassLimits(weight=2.0, max_queued_requests=2, ttft_budget_s=0.001)
    policy = SchedulingPolicy(classes={**SchedulingPolicy().classes, "standard": tight})
    prompts, _, greedy, _ = baseline
    out, engine = _run(tiny_model, prompts * 2, GREEDY, policy=policy, max_num_seqs=2)
    assert out == greedy * 2
    with pytest.raises(QueueFullError):
        for p in prompts:
            engine.add_request(p, GREEDY)
