"""Per-request latencies and run figures, on records with known timestamps."""
import pytest

from llmesh.benchmarks.metrics import RequestRecord, meets_slo, parse_slo, summarize


def _rec(i, arrival, chunks, done=None, status="OK", max_tokens=None):
    r = RequestRecord(i, prompt_tokens=10, max_tokens=max_tokens or sum(n for _, n in chunks),
                      arrival_s=arrival)
    for t, n in chunks:
        r.add_tokens(t, n)
    r.done_s = done if done is not None else (chunks[-1][0] if chunks else None)
    r.status = status
    return r


def test_request_latencies():
    r = _rec(0, 1.0, [(1.2, 1), (1.3, 1), (1.5, 2)])  # 4 tokens, the last two in one message
    assert r.num_output_tokens == 4
    assert r.ttft_s == pytest.approx(0.2)
    assert r.e2e_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.3 / 3)
    assert r.itls_s() == pytest.approx([0.1, 0.1, 0.1])
    one = _rec(1, 0.0, [(0.5, 1)])
    assert one.tpot_s is None and one.itls_s() == []
    r.add_tokens(2.0, 0)  # empty messages are not tokens
    assert len(r.chunk_times) == 3


def test_summary_counts_percentiles_and_goodput():
    recs = [_rec(i, 0.1 * i, [(0.1 * i + 0.05 * (i + 1), 1), (0.1 * i + 0.05 * (i + 1) + 0.01, 3)])
            for i in range(20)]
    recs.append(_rec(20, 0.5, [(0.6, 2)], done=0.7, status="RESOURCE_EXHAUSTED", max_tokens=9))
    recs.append(_rec(21, 0.5, [], done=0.6, status="INVALID_ARGUMENT", max_tokens=3))
    s = summarize(recs, 0.0, parse_slo("ttft_ms=480,tpot_ms=10"))
    assert s["num_requests"] == 22 and s["num_ok"] == 20
    assert s["status_counts"] == {"INVALID_ARGUMENT": 1, "OK": 20, "RESOURCE_EXHAUSTED": 1}
    assert s["output_tokens"] == 20 * 4 + 2  # every token a client received
    end = max(r.done_s for r in recs)
    assert s["duration_s"] == pytest.approx(end)
    assert s["request_throughput"] == pytest.approx(20 / end)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[key]
        assert d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
        assert len(d["quantiles"]) == 101 and d["quantiles"] == sorted(d["quantiles"])
    assert s["ttft_ms"]["count"] == 20 and s["itl_ms"]["count"] == 20 * 3
    # TTFT is 50 ms * (i + 1): the SLO of 480 ms is met by i = 0..8; TPOT 3.3 ms by all
    g = s["goodput"]
    assert g["num_met"] == 9 and g["fraction"] == pytest.approx(9 / 22)
    assert g["requests_per_s"] == pytest.approx(9 / end)


def test_slo_parsing_and_matching():
    assert parse_slo(None) == {} and parse_slo("") == {}
    assert parse_slo("ttft_ms=500, e2e_ms=2000") == {"ttft_ms": 500.0, "e2e_ms": 2000.0}
    for bad in ("ttft=5", "ttft_ms", "ttft_ms=-1", "itl_ms=5"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    r = _rec(0, 0.0, [(0.1, 1), (0.3, 1)])
    assert meets_slo(r, {"ttft_ms": 100.0, "tpot_ms": 200.0})
    assert not meets_slo(r, {"tpot_ms": 199.0})
    assert meets_slo(_rec(1, 0.0, [(0.1, 1)]), {"tpot_ms": 1.0})  # one token: no TPOT to miss
    assert not meets_slo(_rec(2, 0.0, [(0.1, 1)], status="UNAVAILABLE"), {"ttft_ms": 1e6})
