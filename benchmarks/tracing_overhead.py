"""Throughput with tracing on (100% sampled, exported to the local collector)
versus off, same mesh and workload, alternating rounds in one run; also the
CPU time every mesh process spends per output token, on and off.

    python -m benchmarks.tracing_overhead [--model DIR] [--requests 64] [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

from benchmarks.tp import ab_args, ab_setup, log, run_once
from mesh.config import ObservabilityConfig


def main(argv=None) -> int:
    args = ab_args("benchmarks.tracing_overhead", argv)
    model_dir, mc, reqs, warm, limits = ab_setup(args)
    modes = {"on": ObservabilityConfig(tracing="file", sample_ratio=1.0),
             "off": ObservabilityConfig(tracing="off")}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            runs[mode].append(run_once(model_dir, 1, reqs, warm, limits, log,
                                       observability=modes[mode]))
    med = {m: statistics.median(r["output_tokens_per_s"] for r in runs[m]) for m in modes}
    # CPU per output token over every mesh process: on 2 shared cores throughput is
    # bound by it, and it does not move with the cycles other tenants steal
    cpu = {m: statistics.median(r["cpu_ms_per_output_token"] for r in runs[m]) for m in modes}
    share = statistics.median(r["cpu_s"].get("collector", 0.0) / sum(r["cpu_s"].values())
                              for r in runs["on"])
    summary = {"tracing_on_tok_s": med["on"], "tracing_off_tok_s": med["off"],
               "on_over_off": med["on"] / med["off"],
               "cpu_ms_per_token_on": cpu["on"], "cpu_ms_per_token_off": cpu["off"],
               "cpu_on_over_off": cpu["on"] / cpu["off"], "collector_cpu_share": share,
               "rounds": args.rounds, "requests": args.requests}
    if args.json:
        Path(args.json).write_text(json.dumps({"model_dir": model_dir, "model": dataclasses.asdict(mc),
                                               "runs": runs, "summary": summary}, indent=2,
                                              default=str))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
