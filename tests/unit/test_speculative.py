"""Speculative decoding (prompt lookup) gives exactly the tokens, text, logprobs and
finish reasons of plain decoding: greedy and seeded sampling, penalties, n > 1,
stop strings, structured output, batch mixes, chunked prefill, preemption and
prefix hits (hypothesis), with drafts both kept and refused."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llmesh.services.common.grammar_spec import GrammarSpec
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.engine.engine import Engine, EngineConfig
from llmesh.services.scheduler.speculation import SpeculationConfig, propose
from engine_runs import run_arrivals

STOPS = ["e", "a ", "th"]


def test_propose_takes_what_followed_the_latest_longest_match():
    assert propose([1, 2, 3, 4, 5, 9, 9, 2, 3, 4], 3, 4, 2) == [5, 9, 9]
    # the most recent occurrence wins; the longest suffix first
    assert propose([7, 8, 1, 7, 8, 2, 7, 8], 2, 3, 2) == [2, 7]
    assert propose([5, 1, 2, 9, 6, 2, 9], 2, 3, 2) == [6, 2]  # (2, 9) after the 3-gram missed
    assert propose([1, 2, 3], 2, 4, 2) == []  # nothing repeats
    assert propose([5, 5, 5, 5], 4, 3, 1) == [5]  # only what is there
    assert propose([1, 2, 1, 2], 0, 4, 2) == []


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return TextTokenizer(tiny_model_dir)


def _prompt(i: int, r: dict) -> list[int]:
    # a phrase said twice and begun a third time: drafts from the first token on
    phrase = [(i * 131 + j * 17) % 2900 + 5 for j in range(r["phrase"])]
    return [0] + phrase + [3] + phrase + [3] + phrase[:r["phrase"] // 2]


def _params(i: int, r: dict) -> SamplingParams:
    grammar = GrammarSpec("json_object") if r.get("json") else None
    return SamplingParams(max_tokens=r["max_tokens"], n=r["n"], seed=100 + i,
                          temperature=0.9 if r["sampled"] else 0.0, top_p=0.95,
                          stop=r["stop"], ignore_eos=grammar is None, logprobs=r["logprobs"],
                          repetition_penalty=r["penalty"], speculative_tokens=r["k"],
                          grammar=grammar)


def _run(model, tokenizer, reqs, cfg) -> tuple[dict, Engine]:
    engine = Engine(model, EngineConfig(**cfg), tokenizer)
    return run_arrivals(engine, reqs, _prompt, _params), engine


def _exact(out: dict) -> dict:
    """Tokens, text and finish reason of each (request, index)."""
    return {key: rec[:3] for key, rec in out.items()}


request = st.fixed_dictionaries({
    "phrase": st.integers(2, 12), "max_tokens": st.integers(1, 30), "n": st.sampled_from([1, 1, 2]),
    "sampled": st.booleans(), "stop": st.sampled_from([(), (), (STOPS[0],), (STOPS[1], STOPS[2])]),
    "logprobs": st.sampled_from([None, None, 2]), "penalty": st.sampled_from([1.0, 1.0, 1.3]),
    "k": st.sampled_from([None, None, 0, 1, 3, 6]), "arrive": st.integers(0, 5),
    "json": st.sampled_from([False, False, False, True]),  # structured output
})


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(reqs=st.lists(request, min_size=1, max_size=6),
       spec=st.fixed_dictionaries({"num_tokens": st.sampled_from([2, 4, 8]),
                                   "ngram_min": st.sampled_from([1, 2])}),
       kv=st.sampled_from([dict(block_size=4, num_kv_blocks=30, max_num_batched_tokens=24),
                           dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=16),
                           dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=64,
                                max_num_seqs=3)]),
       depth=st.sampled_from([1, 2]))
def test_speculative_equals_plain(tiny_model, tokenizer, reqs, spec, kv, depth):
    reqs = [r for r in reqs if len(_prompt(0, r)) + r["max_tokens"] + 8
            <= kv["num_kv_blocks"] * kv["block_size"]]
    if not reqs:
        return
    plain = [dict(r, k=0) for r in reqs]
    reference, _ = _run(tiny_model, tokenizer, plain, dict(num_kv_blocks=512, pipeline_depth=1))
    got, engine = _run(tiny_model, tokenizer, reqs, dict(
        kv, pipeline_depth=depth, speculation=SpeculationConfig(ngram_max=4, **spec)))
    assert _exact(got) == _exact(reference)
    for key, rec in got.items():  # (a draft's logits come from a wider forward: float noise)
        ref = reference[key][3]
        assert [(t, ids) for t, _, ids in rec[3]] == [(t, ids) for t, _, ids in ref]
        assert [lp for _, lp, _ in rec[3]] == pytest.approx([lp for _, lp, _ in ref], abs=1e-3)
    if all(r["k"] == 0 for r in reqs):
        assert engine.scheduler.speculator.num_draft_tokens == 0


def test_drafts_are_kept_and_refused_and_save_steps(tiny_model, tokenizer):
    """The tiny model falls into loops under greedy decoding: drafts from the loop
    are kept, those from elsewhere refused; fewer steps for the same tokens."""
    reqs = [dict(phrase=6, max_tokens=120, n=1, sampled=False, stop=(), logprobs=None,
                 penalty=1.0, k=None, arrive=0)]
    reference, plain = _run(tiny_model, tokenizer, [dict(reqs[0], k=0)], dict(num_kv_blocks=64))
    got, engine = _run(tiny_model, tokenizer, reqs, dict(
        num_kv_blocks=64, speculation=SpeculationConfig(num_tokens=4, ngram_min=1)))
    assert got == reference
    s = engine.scheduler.speculator
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens
    assert engine.loop.stats.num_steps < plain.loop.stats.num_steps


def test_structured_output_speculates_within_its_grammar(tiny_model, tokenizer):
    """A request with a grammar drafts too: each draft's row is masked by the grammar
    as it stands after the drafts before it, so what is kept is what plain
    constrained decoding gives."""
    def run(k):
        engine = Engine(tiny_model, EngineConfig(
            num_kv_blocks=256, speculation=SpeculationConfig(num_tokens=k, ngram_min=1)),
            tokenizer)
        prompts = [_prompt(i, dict(phrase=5)) for i in range(3)]
        params = [SamplingParams(max_tokens=60, grammar=GrammarSpec("json_object")),
                  SamplingParams(max_tokens=60, temperature=0.8, seed=5,
                                 grammar=GrammarSpec("json_object"))]
        out = [[[c.token_ids for c in cs] for cs in engine.generate(prompts, p)] for p in params]
        s = engine.scheduler.speculator
        engine.close()
        return out, (s.num_draft_tokens, s.num_accepted_tokens)
    plain, none = run(0)
    spec, (drafts, kept) = run(4)
    assert spec == plain and none == (0, 0) and drafts > 0 and kept > 0
