"""PNG plots of a benchmark report (matplotlib, Agg backend), drawn from the report
alone so they can be redrawn from a saved JSON:

- ttft_cdf.png, itl_cdf.png: CDFs from each run's 101 stored quantiles
- throughput_vs_rate.png, p99_ttft_vs_rate.png (and goodput_vs_rate.png with SLOs):
  one line per target over the load points, when the runs are rate or concurrency sweeps
- kv_usage.png: KV usage over time, per target and run, from the sampled figures
"""
from __future__ import annotations

from pathlib import Path


def _plot(path: Path, lines: list[tuple], xlabel: str, ylabel: str, title: str,
          empty: str | None = None, marker: str | None = None,
          log_x: bool = False) -> Path | None:
    """One figure of `lines` ([(label, xs, ys)]): None when there is none to draw, unless
    `empty` says what to write on the figure instead. `log_x`: a log x axis when the
    positive x span over 50x."""
    if not lines and empty is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker=marker, label=label)
    positive = [x for _, xs, _ in lines for x in xs if x > 0]
    if log_x and positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    if not lines:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_run(report: dict, points) -> list[tuple]:
    """A line per target and run: `points(figures)` gives (xs, ys), or None for no line."""
    many = len(report["runs"]) > 1
    lines = []
    for run in report["runs"]:
        for name, t in run["targets"].items():
            xy = points(t)
            if xy:
                lines.append((f"{name} ({run['label']})" if many else name, *xy))
    return lines


def _cdf(report: dict, key: str, title: str, path: Path) -> Path | None:
    def points(t):
        q = t.get(key, {}).get("quantiles")
        return (q, [i / 100 for i in range(len(q))]) if q else None
    return _plot(path, _per_run(report, points), f"{title} (ms)",
                 "fraction of requests" if key != "itl_ms" else "fraction of token gaps",
                 f"{title} CDF, workload {report['workload'].get('name')}", log_x=True)


def _sweep(report: dict, value, ylabel: str, title: str, path: Path) -> Path | None:
    """A line per target over the load points (rate or concurrency)."""
    runs = [r for r in report["runs"] if r["arrivals"]["kind"] != "offline"]
    kinds = {r["arrivals"]["kind"] for r in runs}
    if not runs or ("concurrency" in kinds and len(kinds) > 1):
        return None
    lines = []
    for name in dict.fromkeys(n for r in runs for n in r["targets"]):
        pts = sorted((r["arrivals"]["concurrency" if r["arrivals"]["kind"] == "concurrency"
                                    else "rate"], value(r["targets"][name]))
                     for r in runs if name in r["targets"]
                     and value(r["targets"][name]) is not None)
        if pts:
            lines.append((name, [p[0] for p in pts], [p[1] for p in pts]))
    return _plot(path, lines, "concurrency" if kinds == {"concurrency"} else
                 "offered rate (requests/s)", ylabel, title, empty="", marker="o")


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
        _plot(out / "kv_usage.png", _per_run(report, lambda t: (
            [s[0] for s in t["kv"]["samples"]], [100 * s[1] for s in t["kv"]["samples"]])
            if t.get("kv", {}).get("samples") else None),
            "time since the run started (s)", "KV blocks in use (%)", "KV cache usage over time",
            empty="no target reported KV usage"),
    ]
    if report.get("slo"):
        made.append(_sweep(report, lambda t: t.get("goodput", {}).get("requests_per_s"),
                           "goodput (requests/s meeting every SLO)", "Goodput versus load",
                           out / "goodput_vs_rate.png"))
    return [p for p in made if p is not None]
