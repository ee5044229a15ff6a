"""PNG plots of a benchmark report (matplotlib, Agg backend), drawn from the report
alone so they can be redrawn from a saved JSON:

- ttft_cdf.png, itl_cdf.png: CDFs from each run's 101 stored quantiles
- throughput_vs_rate.png, p99_ttft_vs_rate.png (and goodput_vs_rate.png with SLOs):
  one line per target over the load points, when the runs are rate or concurrency sweeps
- kv_usage.png: KV usage over time, per target and run, from the sampled figures
"""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(name: str, run: dict, many_runs: bool) -> str:
    return f"{name} ({run['label']})" if many_runs else name


def _cdf(report: dict, key: str, title: str, path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    many = len(report["runs"]) > 1
    drawn, lo, hi = 0, None, None
    for run in report["runs"]:
        for name, t in run["targets"].items():
            q = t.get(key, {}).get("quantiles")
            if not q:
                continue
            ax.plot(q, [i / 100 for i in range(len(q))], label=_label(name, run, many))
            positive = [x for x in q if x > 0]
            if positive:
                lo = min(positive) if lo is None else min(lo, min(positive))
                hi = max(q) if hi is None else max(hi, max(q))
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if lo and hi and hi / lo > 50:
        ax.set_xscale("log")
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of token gaps")
    ax.set_title(f"{title} CDF, workload {report['workload'].get('name')}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(report: dict, value, ylabel: str, title: str, path: Path) -> Path | None:
    runs = [r for r in report["runs"] if r["arrivals"]["kind"] != "offline"]
    kinds = {r["arrivals"]["kind"] for r in runs}
    if not runs or ("concurrency" in kinds and len(kinds) > 1):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(n for r in runs for n in r["targets"]))
    for name in names:
        pts = []
        for r in runs:
            t = r["targets"].get(name)
            a = r["arrivals"]
            load = a["concurrency"] if a["kind"] == "concurrency" else a["rate"]
            v = value(t) if t is not None else None
            if v is not None:
                pts.append((load, v))
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("concurrency" if kinds == {"concurrency"} else "offered rate (requests/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _kv_usage(report: dict, path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    many = len(report["runs"]) > 1
    drawn = 0
    for run in report["runs"]:
        for name, t in run["targets"].items():
            samples = t.get("kv", {}).get("samples")
            if not samples:
                continue
            ax.plot([s[0] for s in samples], [100 * s[1] for s in samples],
                    label=_label(name, run, many))
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no target reported KV usage", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("KV blocks in use (%)")
    ax.set_title("KV cache usage over time")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _cdf(report, "ttft_ms", "TTFT", out / "ttft_cdf.png"),
        _cdf(report, "itl_ms", "Inter-token latency", out / "itl_cdf.png"),
        _sweep(report, lambda t: t["output_tokens_per_s"], "output tokens/s",
               "Throughput versus load", out / "throughput_vs_rate.png"),
        _sweep(report, lambda t: t["ttft_ms"].get("p99"), "p99 TTFT (ms)",
               "p99 TTFT versus load", out / "p99_ttft_vs_rate.png"),
        _kv_usage(report, out / "kv_usage.png"),
    ]
    if report.get("slo"):
        made.append(_sweep(report, lambda t: t.get("goodput", {}).get("requests_per_s"),
                           "goodput (requests/s meeting every SLO)", "Goodput versus load",
                           out / "goodput_vs_rate.png"))
    return [p for p in made if p is not None]
