"""Structured output end to end in the engine (scheduler + runner + sampler): the
random-weight tiny model emits only schema-conforming JSON because the grammar
forces it, with n > 1 (forked grammar state) and under preemption (recompute
replays the grammar), and bad constraints are refused before anything runs."""
import json
import re

import pytest

from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.grammar_spec import GrammarSpec
from llmesh.services.common.sampling_params import SamplingParams
from llmesh.services.engine.engine import Engine, EngineConfig
from structured_checks import SCHEMA, conforms

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine.from_pretrained(tiny_model_dir)
    yield e
    e.close()


def _params(**kw):
    return SamplingParams(max_tokens=120, temperature=1.0, grammar=GrammarSpec(
        "json_schema", json.dumps(SCHEMA)), **kw)


def test_schema_forced_on_random_weights_with_n_and_seeds(engine):
    prompts = [[0, 5 + i, 9, 13] for i in range(6)]
    results = engine.generate(prompts, [_params(seed=i, n=2) for i in range(6)])
    for completions in results:
        assert [c.index for c in completions] == [0, 1]
        for c in completions:
            assert c.finish_reason == "stop", c.text  # the grammar ended it (EOS only)
            assert conforms(c.text), c.text
    texts = [c.text for r in results for c in r]
    assert len(set(texts)) > 1  # sampling still samples, inside the grammar


def test_preemption_replays_the_grammar(tiny_model_dir):
    """A cache so small that sequences are preempted and recomputed: the recomputed
    ones replay their output into a fresh grammar and still end valid, and equal a
    run without preemption (seeded sampling is keyed by position)."""
    small = Engine.from_pretrained(tiny_model_dir, EngineConfig(num_kv_blocks=12, block_size=16))
    big = Engine.from_pretrained(tiny_model_dir)
    prompts = [[0] + [7 + i] * 30 for i in range(5)]
    params = [_params(seed=100 + i) for i in range(5)]
    try:
        got = small.generate(prompts, params)
        assert small.scheduler.num_preemptions > 0
        want = big.generate(prompts, params)
    finally:
        small.close()
        big.close()
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in want]
    assert all(conforms(r[0].text) for r in got)


def test_regex_and_json_object(engine):
    out = engine.generate([[0, 11, 12]], SamplingParams(
        max_tokens=40, temperature=1.0, seed=3,
        grammar=GrammarSpec("regex", r"(yes|no), [0-9]{2}")))[0][0]
    assert re.fullmatch(r"(yes|no), [0-9]{2}", out.text), out.text
    out = engine.generate([[0, 11, 12]], SamplingParams(
        max_tokens=60, temperature=0.0, grammar=GrammarSpec("json_object")))[0][0]
    if out.finish_reason == "stop":  # an open object may run to max_tokens on random weights
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


@pytest.mark.parametrize("params,field", [
    (SamplingParams(grammar=GrammarSpec("json_schema", "{not json")), "response_format"),
    (SamplingParams(grammar=GrammarSpec("json_schema", '{"type": "nonsense"}')), "response_format"),
    (SamplingParams(grammar=GrammarSpec("regex", "(unclosed")), "grammar"),
    (SamplingParams(grammar=GrammarSpec("ebnf", "root ::= missing_rule")), "grammar"),
    (SamplingParams(grammar=GrammarSpec("json_object"), ignore_eos=True), "ignore_eos"),
])
def test_bad_constraints_are_refused_before_queueing(engine, params, field):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([0, 5, 6], params)
    assert info.value.field == field
    assert not engine.has_unfinished()
