"""Render a benchmark JSON as Markdown (and its plots).

    python -m llmesh.benchmarks.report OUT.json [--plots DIR]

Reads both the serving-benchmark reports (`runs`) and the older offline reports
(top-level `targets`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmesh.benchmarks.kit import md_table


def _ms(d: dict, key: str) -> str:
    v = d.get(key)
    return "" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _trio(d: dict) -> str:
    return " / ".join(_ms(d, k) for k in ("p50", "p90", "p99")) if d.get("count") else ""


def _pct(v) -> str:
    return "" if v is None else f"{v:.1%}"


def _errors(counts: dict) -> str:
    bad = {k: v for k, v in counts.items() if k != "OK"}
    return ", ".join(f"{k} {v}" for k, v in bad.items()) or "0"


def run_table(run: dict, baseline: str | None, slo: dict) -> str:
    head = ["target", "req/s", "output tok/s", f"vs {baseline}" if baseline else "ratio",
            "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "ITL ms p50/p90/p99",
            "E2E ms p50/p90/p99"]
    if slo:
        head.append("goodput req/s (met)")
    head += ["errors", "peak KV", "KV waste at peak", "preemptions", "step ms (memory bound)"]
    rows = []
    for name, t in run["targets"].items():
        kv = t.get("kv", {})
        ratio = t.get("vs_baseline", {}).get("output_tokens_per_s")
        roof = t.get("roofline", {})
        step = "" if roof.get("measured_step_ms") is None else \
            f"{roof['measured_step_ms']:.2f} ({roof['bound_step_ms']:.3f})"
        waste = kv.get("waste_at_peak")
        if waste is None and kv.get("slot_utilisation") is not None:
            waste = 1.0 - kv["slot_utilisation"]  # hf-static: padded slots over the whole run
        cells = [name, f"{t['request_throughput']:.2f}", f"{t['output_tokens_per_s']:.1f}",
                 "" if ratio is None else f"{ratio:.2f}x", _trio(t["ttft_ms"]),
                 _trio(t["tpot_ms"]), _trio(t["itl_ms"]), _trio(t["e2e_ms"])]
        if slo:
            g = t.get("goodput", {})
            cells.append(f"{g.get('requests_per_s', 0):.2f} ({g.get('fraction', 0):.0%})")
        cells += [_errors(t["status_counts"]), _pct(kv.get("peak_usage")), _pct(waste),
                  str(kv.get("preemptions", ""))]
        rows.append(cells + [step])
    notes = []
    if any(t.get("kv", {}).get("slot_utilisation") is not None for t in run["targets"].values()):
        notes.append("Static batching's KV waste is over the whole run: every row holds a slot "
                     "for each position up to its batch's longest prompt plus longest output.")
    if any(t.get("roofline", {}).get("measured_step_ms") for t in run["targets"].values()):
        notes.append("Step ms: mean measured step (prefill chunks included); in brackets the "
                     "time its bytes (weights + mean KV) take at the measured memory bandwidth.")
    return md_table(head, rows) + "".join("\n\n" + n for n in notes)


def sweep_table(report: dict) -> str:
    """Per target and load point: throughput, p99 TTFT, goodput (a latency-throughput curve)."""
    slo = report.get("slo") or {}
    names = dict.fromkeys(n for r in report["runs"] for n in r["targets"])
    return md_table(
        ["target", "load", "req/s", "output tok/s", "TTFT p99 ms", "ITL p99 ms"]
        + ["goodput req/s"] * bool(slo),
        [[name, run["label"], f"{t['request_throughput']:.2f}", f"{t['output_tokens_per_s']:.1f}",
          _ms(t["ttft_ms"], "p99"), _ms(t["itl_ms"], "p99")]
         + [f"{t.get('goodput', {}).get('requests_per_s', 0):.2f}"] * bool(slo)
         for name in names for run in report["runs"]
         if (t := run["targets"].get(name)) is not None])


def roofline_line(report: dict) -> str:
    """One line: what a decode step must move, the bound that gives, and how close each
    target's measured steps came (first run that measured them)."""
    bw = report["memory_bandwidth"]["bytes_per_s"]
    model = report["model"]
    parts = []
    kv_mb = None
    for run in report["runs"]:
        for name, t in run["targets"].items():
            roof = t.get("roofline", {})
            if roof.get("measured_step_ms") is None or any(name in p for p in parts):
                continue
            if kv_mb is None and roof.get("kv_bytes_per_step"):
                kv_mb = roof["kv_bytes_per_step"] / 1e6
            parts.append(f"{name} {roof['measured_step_ms']:.2f} ms vs {roof['bound_step_ms']:.3f} ms "
                         f"bound ({roof['fraction_of_bound']:.1%} of the memory limit)")
    weights = model["decode_bytes"] / 1e6
    line = (f"Roofline: a decode step reads {weights:.1f} MB of weights"
            + (f" + {kv_mb:.1f} MB of KV (mean while running)" if kv_mb else "")
            + f"; at the measured {bw / 1e9:.1f} GB/s ({report['memory_bandwidth']['device']} "
            f"copy) that takes at least {weights * 1e6 / bw * 1000:.3f} ms for the weights alone. ")
    return line + ("Measured mean steps: " + "; ".join(parts) + "." if parts else
                   "No target measured its steps.")


def markdown(report: dict) -> str:
    if "runs" not in report:
        return legacy_offline(report)
    w, m, v, model = report["workload"], report["machine"], report["versions"], report["model"]
    slo = report.get("slo") or {}
    out = [f"# llmesh bench: {w.get('name')}", "",
           f"Model: {model['architecture']}, {model['num_params'] / 1e6:.1f}M parameters, "
           f"{model['bytes'] / 1e6:.1f} MB at {model['dtype']} (`{model['dir']}`). Workload "
           f"`{w.get('name')}` (seed {w.get('seed')}). Baseline for ratios: "
           f"{report.get('baseline')}." + (" SLO: " + ", ".join(f"{k} <= {val:g}"
                                                                for k, val in slo.items()) + "."
                                           if slo else ""),
           "", roofline_line(report), ""]
    for run in report["runs"]:
        size = [f"{run['num_requests']} requests" if run.get("num_requests") else "",
                f"{run['duration_s']:g} s" if run.get("duration_s") else ""]
        out += [f"## {run['label']}" + (f" ({', '.join(s for s in size if s)})"
                                         if any(size) else ""), "",
                run_table(run, report.get("baseline"), slo), ""]
    if len(report["runs"]) > 1:
        out += ["## Sweep", "", sweep_table(report), ""]
    if report.get("failed_targets"):
        out += ["Failed targets: " + "; ".join(f"{k}: {e}" for k, e in
                                               report["failed_targets"].items()), ""]
    out.append(f"Machine: {m['cpu']}, {m['num_cpus']} CPUs, torch threads {m['torch_threads']}"
               + (f", GPU {m['gpu']}" if m.get("gpu") else "") + "; "
               + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; {report['timestamp']}.")
    return "\n".join(out) + "\n"


def legacy_offline(report: dict) -> str:
    """The table of an offline report written before the serving benchmark existed."""
    rows = []
    for name, t in report["targets"].items():
        util = t.get("kv_slot_utilisation_at_peak", t.get("kv_slot_utilisation"))
        rows.append([name, f"{t['output_tokens_per_s']:.1f}", f"{t['wall_s']:.1f}",
                     f"{t.get('engine_speedup', float('nan')):.2f}x",
                     _pct(t.get("peak_kv_usage")), _pct(util)])
    return md_table(["target", "output tok/s", "wall s", "engine speedup", "peak KV usage",
                     "KV slot utilisation"], rows) + "\n"


def write_outputs(report: dict, json_out: str | Path | None, md_out: str | Path | None,
                  plots_dir: str | Path | None) -> list[Path]:
    """JSON, Markdown and PNG plots; returns the paths written."""
    from llmesh.benchmarks.kit import write_json
    written = []
    if json_out:
        write_json(report, json_out)
        written.append(Path(json_out))
    if md_out:
        Path(md_out).parent.mkdir(parents=True, exist_ok=True)
        Path(md_out).write_text(markdown(report))
        written.append(Path(md_out))
    if plots_dir and "runs" in report:
        from llmesh.benchmarks.plots import write_plots
        written += write_plots(report, plots_dir)
    return written


def default_paths(json_out: str | Path) -> tuple[Path, Path]:
    """OUT.json -> OUT.md and OUT-plots/."""
    p = Path(json_out)
    return p.with_suffix(".md"), p.with_name(p.stem + "-plots")


def main(argv: list[str]) -> int:
    import json
    ap = argparse.ArgumentParser(prog="python -m llmesh.benchmarks.report")
    ap.add_argument("json")
    ap.add_argument("--plots", help="also write the PNG plots into this directory")
    args = ap.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    print(markdown(report), end="")
    if args.plots and "runs" in report:
        from llmesh.benchmarks.plots import write_plots
        for path in write_plots(report, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
