"""Render an offline benchmark JSON as the Markdown table in BENCHMARKS.md.

    python -m benchmarks.report benchmarks/results/offline.json
"""
from __future__ import annotations

import json
import sys


def offline_table(report: dict) -> str:
    rows = ["| target | output tok/s | wall s | engine speedup | peak KV usage | KV slot utilisation |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, t in report["targets"].items():
        util = t.get("kv_slot_utilisation_at_peak", t.get("kv_slot_utilisation"))
        peak = t.get("peak_kv_usage")
        rows.append(
            f"| {name} | {t['output_tokens_per_s']:.1f} | {t['wall_s']:.1f} | "
            f"{t.get('engine_speedup', float('nan')):.2f}x | "
            f"{'' if peak is None else f'{peak:.1%}'} | {'' if util is None else f'{util:.1%}'} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    report = json.loads(open(argv[0]).read())
    w, m, v = report["workload"], report["machine"], report["versions"]
    print(f"Workload: {w['num_requests']} requests, {w['prompt_tokens']} prompt tokens, "
          f"{w['output_tokens']} output tokens (seed {w['seed']}); model "
          f"{report['model']['architecture']} with {report['model']['num_params'] / 1e6:.1f}M parameters.\n")
    print(offline_table(report))
    print(f"\nMachine: {m['cpu']}, {m['num_cpus']} CPUs, torch threads {m['torch_threads']}; "
          + ", ".join(f"{k} {val}" for k, val in v.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
