"""The flood A/B's results as one table (run after flood_ab.sh): per rate, round and
load generator: admitted, refusal p50 / p99, admitted TTFT p50 / p99 / max."""
import json
import sys
from pathlib import Path

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
print("| rate | round | load generator | sent | admitted | refusal p50 / p99 ms | "
      "admitted TTFT p50 / p99 / max ms (samples) | admitted streams' end p99 ms |")
print("|---|---|---|---:|---:|---|---|---:|")
for rate in (300, 900):
    for rnd in (1, 2, 3):
        for cfg in ("python", "h2load", "h2load-gw100"):
            p = here / f"rate{rate}-r{rnd}-{cfg}.json"
            if not p.exists():
                continue
            d = json.loads(p.read_text())
            if cfg == "python":
                sent = sum(d["statuses"].values())
                admitted = d["statuses"].get("OK", 0)
                ref, ttft, end = d["refused_ms"], d["admitted_ttft_ms"], None
            else:
                f = d["flood"]
                sent, admitted = f["sent"], f["statuses"].get("200", 0)
                ref, ttft, end = f["refused_ms"], d["probe"]["admitted_ttft_ms"], f["admitted_stream_ms"]
            def pq(x, *keys):
                return " / ".join(f"{x[k]:,.0f}" for k in keys) if x.get("count") else "-"
            print(f"| {rate} | {rnd} | {cfg} | {sent:,} | {admitted:,} | {pq(ref, 'p50', 'p99')} | "
                  f"{pq(ttft, 'p50', 'p99', 'max')} ({ttft.get('count', 0)}) | "
                  f"{pq(end, 'p99') if end else '-'} |")
