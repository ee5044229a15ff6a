"""Benchmark workloads: seeded, reproducible, within the model's limits, JSONL round trips,
ShareGPT files; arrival processes: seeded schedules with the asked-for rate and shape."""
import json
import statistics

import pytest

from llmesh.benchmarks import workload as wl
from llmesh.benchmarks.arrivals import ArrivalSpec, parse_rates, schedule

VOCAB, CTX = 3072, 2048


@pytest.mark.parametrize("name", wl.BUILTIN)
def test_builtin_workloads_are_reproducible_and_fit_the_context(name):
    w = wl.builtin(name, VOCAB, CTX, seed=3)
    first = w.take(40)
    assert [(r.prompt_token_ids, r.max_tokens) for r in first] == \
        [(r.prompt_token_ids, r.max_tokens) for r in wl.builtin(name, VOCAB, CTX, seed=3).take(40)]
    other_part = w.take(40, part=1)
    assert [r.prompt_token_ids for r in other_part] != [r.prompt_token_ids for r in first]
    assert [r.prompt_token_ids for r in wl.builtin(name, VOCAB, CTX, seed=4).take(40)] != \
        [r.prompt_token_ids for r in first]
    for r in first + other_part:
        assert r.max_tokens >= 1 and len(r.prompt_token_ids) + r.max_tokens <= CTX
        assert r.prompt_token_ids[0] == 0
        assert all(wl.FIRST_RANDOM_TOKEN <= t < VOCAB for t in r.prompt_token_ids[1:])


def test_chat_is_long_tailed_and_equals_the_offline_workload():
    reqs = wl.chat(VOCAB, CTX, seed=0).take(300)
    prompts = sorted(len(r.prompt_token_ids) for r in reqs)
    outputs = sorted(r.max_tokens for r in reqs)
    assert prompts[-1] > 4 * prompts[len(prompts) // 2]  # tail well beyond the median
    assert outputs[-1] > 4 * outputs[len(outputs) // 2]
    legacy = wl.offline_workload(300, VOCAB, seed=0)
    assert [(r.prompt_token_ids, r.max_tokens) for r in legacy] == \
        [(r.prompt_token_ids, r.max_tokens) for r in reqs]


def test_shared_prefix_long_context_and_bursty_shapes():
    shared = wl.builtin("shared-prefix", VOCAB, CTX, seed=1).take(30)
    prefix = shared[0].prompt_token_ids[:512]
    assert all(r.prompt_token_ids[:512] == prefix for r in shared)
    assert len({tuple(r.prompt_token_ids) for r in shared}) == 30  # the user turns differ
    long = wl.builtin("long-context", VOCAB, CTX, seed=1).take(10)
    assert all(len(r.prompt_token_ids) >= 0.8 * (CTX - r.max_tokens) - 1 for r in long)
    bursty = wl.builtin("bursty", VOCAB, CTX, seed=1)
    assert bursty.burst == {"start_frac": 0.4, "end_frac": 0.6, "factor": 10.0}
    assert wl.builtin("chat", VOCAB, CTX, seed=1).burst is None


def test_jsonl_round_trip_keeps_requests_and_burst(tmp_path):
    w = wl.builtin("bursty", VOCAB, CTX, seed=2)
    path = wl.write_jsonl(tmp_path / "w.jsonl", w, 25)
    back = wl.load(str(path), VOCAB, CTX)
    assert back.burst == w.burst and back.meta["num_distinct_requests"] == 25
    got = back.take(50)  # cycles after the 25 in the file
    want = w.take(25)
    assert [(r.prompt_token_ids, r.max_tokens) for r in got] == \
        [(r.prompt_token_ids, r.max_tokens) for r in want + want]


def test_jsonl_text_prompts_and_sharegpt_need_the_tokenizer(tmp_path, tiny_model_dir):
    from llmesh.services.common.tokenizer import TextTokenizer
    tok = TextTokenizer(tiny_model_dir)
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "The lighthouse keeper",
                                                  "max_tokens": 7}) + "\n")
    [req] = wl.load(str(tmp_path / "t.jsonl"), VOCAB, CTX, model_dir=tiny_model_dir).take(1)
    assert req.prompt_token_ids == tok.encode("The lighthouse keeper") and req.max_tokens == 7

    convs = [
        {"id": "a", "conversations": [{"from": "human", "value": "Where is the lighthouse keeper today?"},
                                      {"from": "gpt", "value": "She climbed the spiral stairs."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"},  # too short: skipped
                                      {"from": "gpt", "value": "Hello there."}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "no human turn first"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Tell me about the baker and bread."},
                                      {"from": "gpt", "value": "The smell of bread drifted " * 3},
                                      {"from": "human", "value": "a later turn is not used"}]},
    ]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    w = wl.load(str(tmp_path / "sg.json"), VOCAB, CTX, seed=0, model_dir=tiny_model_dir)
    assert w.meta["num_distinct_requests"] == 2
    expect = {tuple(tok.encode(c["conversations"][0]["value"])):
              len(tok.encode(c["conversations"][1]["value"], add_special_tokens=False))
              for c in (convs[0], convs[3])}
    got = w.take(6)
    assert {tuple(r.prompt_token_ids): r.max_tokens for r in got} == expect
    with pytest.raises(ValueError, match="unknown workload"):
        wl.load("no-such-workload", VOCAB, CTX)


# ---- arrivals ---------------------------------------------------------------
def test_offline_and_poisson_schedules():
    assert schedule(ArrivalSpec("offline"), 5, None) == [0.0] * 5
    a = schedule(ArrivalSpec("poisson", rate=50.0), 4000, None, seed=1)
    assert a == schedule(ArrivalSpec("poisson", rate=50.0), 4000, None, seed=1)
    assert a != schedule(ArrivalSpec("poisson", rate=50.0), 4000, None, seed=2)
    gaps = [y - x for x, y in zip([0.0] + a, a)]
    assert all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.08)
    by_time = schedule(ArrivalSpec("poisson", rate=50.0), None, 20.0, seed=1)
    assert max(by_time) < 20.0 and len(by_time) == pytest.approx(1000, rel=0.1)
    assert len(schedule(ArrivalSpec("poisson", rate=50.0), 10, 20.0)) == 10  # whichever first


def test_gamma_burstiness_sets_the_spread():
    for b, cv in ((0.25, 2.0), (4.0, 0.5)):
        a = schedule(ArrivalSpec("gamma", rate=20.0, burstiness=b), 4000, None, seed=3)
        gaps = [y - x for x, y in zip([0.0] + a, a)]
        assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.08)
        assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.1)


def test_burst_window_is_ten_times_denser():
    burst = {"start_frac": 0.4, "end_frac": 0.6, "factor": 10.0}
    a = schedule(ArrivalSpec("poisson", rate=20.0), None, 100.0, seed=4, burst=burst)
    inside = sum(40.0 <= t < 60.0 for t in a) / 20.0
    outside = sum(not (40.0 <= t < 60.0) for t in a) / 80.0
    assert inside / outside == pytest.approx(10.0, rel=0.15)
    by_count = schedule(ArrivalSpec("poisson", rate=20.0), 2800, None, seed=4, burst=burst)
    # 2800 requests at 20/s with the spike take about 2800 / (20 * 2.8) = 50 s
    assert by_count[-1] == pytest.approx(50.0, rel=0.1)


def test_arrival_validation():
    for bad in (lambda: ArrivalSpec("poisson"), lambda: ArrivalSpec("gamma", rate=1, burstiness=0),
                lambda: ArrivalSpec("concurrency"), lambda: ArrivalSpec("uniform"),
                lambda: schedule(ArrivalSpec("offline"), None, 5.0),
                lambda: schedule(ArrivalSpec("poisson", rate=1.0), None, None),
                lambda: parse_rates("1,-2"), lambda: parse_rates("")):
        with pytest.raises(ValueError):
            bad()
    assert parse_rates("0.5, 2,4") == [0.5, 2.0, 4.0]
