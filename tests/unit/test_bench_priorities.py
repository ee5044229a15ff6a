"""The priorities A/B benchmark's pure parts: seeded class tagging, per-class figures,
goodput under per-class SLOs, medians and on/off ratios (synthetic records, no mesh)."""
import pytest

from llmesh.benchmarks import priorities as pr
from llmesh.benchmarks.metrics import RequestRecord

VOCAB, CTX = 3072, 2048


def test_class_tagging_is_seeded_and_reproducible():
    w = pr.classed(VOCAB, CTX, seed=5, interactive_share=0.3)
    first = w.take(400)
    again = pr.classed(VOCAB, CTX, seed=5, interactive_share=0.3).take(400)
    assert [(r.priority, r.prompt_token_ids, r.max_tokens) for r in first] == \
        [(r.priority, r.prompt_token_ids, r.max_tokens) for r in again]
    other = pr.classed(VOCAB, CTX, seed=6, interactive_share=0.3).take(400)
    assert [r.priority for r in other] != [r.priority for r in first]
    share = sum(r.priority == "interactive" for r in first) / len(first)
    assert 0.22 < share < 0.38
    assert {r.priority for r in first} == {"interactive", "batch"}
    inter = [r for r in first if r.priority == "interactive"]
    batch = [r for r in first if r.priority == "batch"]
    assert max(r.max_tokens for r in inter) <= 32 <= min(r.max_tokens for r in batch)
    assert max(len(r.prompt_token_ids) for r in inter) <= 128
    for r in first:
        assert len(r.prompt_token_ids) + r.max_tokens <= CTX and r.prompt_token_ids[0] == 0
    assert w.burst == {"start_frac": 0.4, "end_frac": 0.6, "factor": 10.0}
    assert all(r.priority == "batch" for r in pr.classed(VOCAB, CTX, 1, 0.0).take(50))
    assert all(r.priority == "interactive" for r in pr.classed(VOCAB, CTX, 1, 1.0).take(50))
    with pytest.raises(ValueError):
        pr.classed(VOCAB, CTX, 1, 1.5)


def _rec(index, arrival, ttft, gap, n, status="OK"):
    """A request arriving at `arrival` s whose n tokens come `ttft` s later, then every `gap` s."""
    rec = RequestRecord(index, 10, n, arrival)
    if status == "OK":
        for k in range(n):
            rec.add_tokens(arrival + ttft + k * gap, 1)
        rec.done_s = arrival + ttft + (n - 1) * gap
    else:
        rec.done_s = arrival + 0.5
    rec.status = status
    return rec


def _synthetic():
    # interactive: TTFTs 0.1 .. 1.0 s (index 0..9), 5 tokens 0.05 s apart
    recs = [_rec(i, float(i), 0.1 * (i + 1), 0.05, 5) for i in range(10)]
    # batch: TTFTs 2 .. 11 s, 11 tokens 0.3 s apart; one rejected
    recs += [_rec(10 + i, float(i), 2.0 + i, 0.3, 11) for i in range(9)]
    recs.append(_rec(19, 9.0, 0, 0, 0, status="RESOURCE_EXHAUSTED"))
    classes = ["interactive"] * 10 + ["batch"] * 10
    return recs, classes


def test_per_class_figures_and_goodput_on_synthetic_records():
    recs, classes = _synthetic()
    slos = {"interactive": {"ttft_ms": 550.0, "tpot_ms": 200.0}, "batch": {}}
    run = pr.summarize_run(recs, classes, 0.0, slos)
    inter, batch = run["classes"]["interactive"], run["classes"]["batch"]
    assert list(run["classes"]) == ["interactive", "batch"]
    assert inter["num_requests"] == 10 and batch["num_requests"] == 10 and batch["num_ok"] == 9
    assert inter["ttft_ms"]["p50"] == pytest.approx(550.0)  # median of 100..1000 ms
    assert inter["ttft_ms"]["p99"] == pytest.approx(991.0)  # linear interpolation
    assert batch["ttft_ms"]["p50"] == pytest.approx(6000.0)
    assert batch["ttft_ms"]["count"] == 9  # the rejected one has no TTFT
    assert inter["tpot_ms"]["p50"] == pytest.approx(50.0)
    # interactive: TTFT <= 550 ms for the first five; batch: completed = good
    assert inter["goodput"]["num_met"] == 5 and inter["goodput"]["fraction"] == 0.5
    assert batch["goodput"]["num_met"] == 9
    assert run["goodput"]["num_met"] == 14 and run["goodput"]["fraction"] == pytest.approx(0.7)
    assert run["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert run["status_counts"] == {"OK": 19, "RESOURCE_EXHAUSTED": 1}
    # the last token: batch index 8 arrives at 8 s, first token at 18 s, 10 gaps of 0.3 s
    assert run["duration_s"] == pytest.approx(21.0)
    assert run["output_tokens"] == 10 * 5 + 9 * 11
    assert run["output_tokens_per_s"] == pytest.approx(149 / 21.0)
    assert run["goodput"]["requests_per_s"] == pytest.approx(14 / 21.0)
    # a tighter batch SLO only lowers batch goodput
    strict = pr.summarize_run(recs, classes, 0.0, dict(slos, batch={"ttft_ms": 4000.0}))
    assert strict["classes"]["batch"]["goodput"]["num_met"] == 3
    assert strict["classes"]["interactive"] == inter
    run["preemptions"] = 7
    h = pr.headline(run)
    assert h["interactive_ttft_p99_ms"] == pytest.approx(991.0)
    assert h["batch_ttft_p50_ms"] == pytest.approx(6000.0)
    assert h["errors"] == 1 and h["preemptions"] == 7


def test_medians_ratios_and_table():
    recs, classes = _synthetic()
    slos = {"interactive": {"ttft_ms": 550.0}, "batch": {}}
    base = pr.summarize_run(recs, classes, 0.0, slos)
    on = [dict(pr.headline(base), interactive_ttft_p99_ms=v, preemptions=p)
          for v, p in ((100.0, 3), (300.0, 5))]
    off = [dict(pr.headline(base), interactive_ttft_p99_ms=v, preemptions=0)
           for v in (1000.0, 2000.0)]
    runs = {"on": [{"headline": h, "status_counts": {"OK": 20}} for h in on],
            "off": [{"headline": h, "status_counts": {"OK": 20}} for h in off]}
    s = pr.summarize_rounds(runs)
    assert s["rounds"] == 2
    assert s["median"]["on"]["interactive_ttft_p99_ms"] == 200.0
    assert s["median"]["off"]["interactive_ttft_p99_ms"] == 1500.0
    assert s["on_over_off"]["interactive_ttft_p99_ms"] == pytest.approx(200.0 / 1500.0)
    assert s["on_over_off"]["batch_ttft_p50_ms"] == pytest.approx(1.0)
    assert s["on_over_off"]["preemptions"] is None  # off had none: no ratio
    assert pr.medians([{"a": None}, {"a": 2.0}, {"a": 4.0}]) == {"a": 3.0}
    assert pr.ratios({"a": 1.0, "b": None}, {"a": 0.0, "b": 1.0}) == {"a": None, "b": None}
    table = pr.markdown(s)
    assert "| interactive TTFT p99 (ms) | 200 | 1500 | 0.13 |" in table
    assert "| preemptions | 4 | 0 | n/a |" in table
    assert pr.markdown_rounds(runs).count("\n") == 1 + 4
