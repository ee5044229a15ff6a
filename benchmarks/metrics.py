"""Per-request records as the client saw them, and the figures of a run.

Latencies are measured from a request's intended arrival time (so a client
that falls behind its schedule shows up as latency, not as a lower rate):
TTFT to the first token received, end-to-end to the last; TPOT is the mean gap
per output token after the first; ITL is every gap between tokens received
(a message carrying k tokens counts as k gaps of 1/k of its delay each).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_tokens: int
    arrival_s: float  # intended arrival (time.perf_counter clock)
    sent_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # when tokens were received
    chunk_tokens: list[int] = field(default_factory=list)  # how many in each message
    done_s: float | None = None
    status: str = "PENDING"  # "OK" or a gRPC status name
    finish_reason: str = ""
    server_output_tokens: int | None = None  # what the server reports it produced
    error: str = ""

    def add_tokens(self, t: float, count: int) -> None:
        if count:
            self.chunk_times.append(t)
            self.chunk_tokens.append(count)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.arrival_s if self.chunk_times else None

    @property
    def e2e_s(self) -> float | None:
        return self.done_s - self.arrival_s if self.done_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        n = self.num_output_tokens
        if n < 2 or self.done_s is None:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (n - 1)

    def itls_s(self) -> list[float]:
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            gap = self.chunk_times[i] - self.chunk_times[i - 1]
            k = self.chunk_tokens[i]
            out.extend([gap / k] * k)
        if self.chunk_tokens and self.chunk_tokens[0] > 1:  # tokens after the first, same message
            out.extend([0.0] * (self.chunk_tokens[0] - 1))
        return out


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,tpot_ms=100` -> {"ttft_ms": 500.0, "tpot_ms": 100.0}."""
    slo: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"SLO {part!r}: expected KEY=VALUE with KEY one of {', '.join(SLO_KEYS)}")
        slo[key] = float(value)
        if not slo[key] > 0:
            raise ValueError(f"SLO {key} must be > 0")
    return slo


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if rec.status != "OK":
        return False
    measured = {"ttft_ms": rec.ttft_s, "tpot_ms": rec.tpot_s, "e2e_ms": rec.e2e_s}
    for key, limit in slo.items():
        value = measured[key]
        if value is None:
            if key == "tpot_ms":  # a one-token output has no TPOT to miss
                continue
            return False
        if value * 1000 > limit:
            return False
    return True


def distribution(values_s: list[float]) -> dict:
    """mean / p50 / p90 / p99 / max in milliseconds, and 101 quantiles for CDF plots."""
    if not values_s:
        return {"count": 0}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    pct = np.percentile(ms, PERCENTILES)
    out = {"count": int(ms.size), "mean": float(ms.mean()), "max": float(ms.max())}
    out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)})
    out["quantiles"] = [round(float(v), 4) for v in np.percentile(ms, np.arange(101))]
    return out


def summarize(records: list[RequestRecord], start_s: float, slo: dict[str, float]) -> dict:
    """The figures of one run of one target."""
    ok = [r for r in records if r.status == "OK"]
    ends = [r.done_s for r in records if r.done_s is not None]
    end_s = max(ends) if ends else start_s
    duration = max(end_s - start_s, 1e-9)
    num_out = sum(r.num_output_tokens for r in records)
    num_prompt = sum(r.prompt_tokens for r in records)
    errors: dict[str, int] = {}
    for r in records:
        errors[r.status] = errors.get(r.status, 0) + 1
    itls = [x for r in ok for x in r.itls_s()]
    out = {
        "num_requests": len(records),
        "num_ok": len(ok),
        "status_counts": dict(sorted(errors.items())),
        "duration_s": duration,
        "prompt_tokens": num_prompt,
        "output_tokens": num_out,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": num_out / duration,
        "total_tokens_per_s": (num_out + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": distribution(itls),
        "e2e_ms": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    if slo:
        met = sum(meets_slo(r, slo) for r in records)
        out["goodput"] = {"slo": dict(slo), "num_met": met,
                          "fraction": met / len(records) if records else 0.0,
                          "requests_per_s": met / duration}
    return out


def request_rows(records: list[RequestRecord], start_s: float) -> list[list]:
    """Per request: [arrival_s, ttft_ms, e2e_ms, prompt_tokens, output_tokens, status]."""
    def ms(v):
        return None if v is None else round(v * 1000, 3)
    return [[round(r.arrival_s - start_s, 4), ms(r.ttft_s), ms(r.e2e_s), r.prompt_tokens,
             r.num_output_tokens, r.status] for r in records]
