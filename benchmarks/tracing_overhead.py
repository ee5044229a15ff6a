"""Throughput with tracing on (100% sampled, exported to the local collector)
versus off, same mesh and workload, alternating rounds in one run.

    python -m benchmarks.tracing_overhead [--model DIR] [--requests 64] [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from benchmarks.tp import run_once, workload
from mesh.config import EngineLimits, ObservabilityConfig
from services.executor.model_config import load_model_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.tracing_overhead")
    p.add_argument("--model", help="model directory (default: the bench preset)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    from mesh.default_model import default_model_dir
    model_dir = str(args.model or default_model_dir("bench"))
    mc = load_model_config(model_dir)
    reqs = workload(args.requests, mc.vocab_size, args.seed)
    warm = workload(4, mc.vocab_size, args.seed + 1)
    limits = EngineLimits(num_kv_blocks=4096, max_num_batched_tokens=1024, max_num_seqs=64)
    modes = {"on": ObservabilityConfig(tracing="file", sample_ratio=1.0),
             "off": ObservabilityConfig(tracing="off")}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            runs[mode].append(run_once(model_dir, 1, reqs, warm, limits, log,
                                       observability=modes[mode]))
    med = {m: statistics.median(r["output_tokens_per_s"] for r in runs[m]) for m in modes}
    summary = {"tracing_on_tok_s": med["on"], "tracing_off_tok_s": med["off"],
               "on_over_off": med["on"] / med["off"], "rounds": args.rounds,
               "requests": args.requests}
    if args.json:
        Path(args.json).write_text(json.dumps({"model_dir": model_dir, "model": dataclasses.asdict(mc),
                                               "runs": runs, "summary": summary}, indent=2,
                                              default=str))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
