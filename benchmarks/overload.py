"""Overload far past capacity: what admission lets in, and how long those wait.

An open-loop flood of gRPC `Generate` requests (`--rate` per second for
`--duration` s, 41-token prompts) through Envoy into one tiny replica. Every
answer should be OK or RESOURCE_EXHAUSTED with a retry hint, and the admitted
requests' TTFT should stay within their class's budget (interactive 2 s,
standard 15 s): that is what SLO-aware admission promises. Reports statuses, the
share refused, and the admitted requests' TTFT percentiles.

`--client h2load`: the flood comes from h2load instead (benchmarks/h2load.py: the
same prompts' length, tokens and class as OpenAI completions over HTTP/2, for a
small share of a core), its refusals timed by h2load, and a Python probe of
`--probe-rate` gRPC requests a second inside it times the admitted requests'
first tokens.
"""
from __future__ import annotations

import asyncio
import collections
from pathlib import Path

from llmesh.benchmarks import h2load, kit

PRIORITIES = {"interactive": 1, "standard": 2, "batch": 3}


def flood(endpoint: str, rate: float, duration_s: float, priority: int,
          max_tokens: int) -> list[dict]:
    """Evenly spaced requests (bounded in count and time); their answers (kit.generate)."""
    def make(i: int):
        return kit.request([0] + [(13 * i + 7 * j) % 2900 + 5 for j in range(40)], max_tokens,
                           priority)
    return kit.load(endpoint, make, count=int(rate * duration_s), rate=rate, timeout_s=300)


def summary(answers: list[dict]) -> dict:
    refused = [a for a in answers if a["status"] == "RESOURCE_EXHAUSTED"]
    return {"statuses": dict(collections.Counter(a["status"] for a in answers)),
            "refused_share": round(len(refused) / len(answers), 3),
            "refusals_with_retry_hint": sum(a["retry_hint"] for a in refused),
            # how long a refusal took to come back (sent to the RESOURCE_EXHAUSTED)
            "refused_ms": kit.percentiles([a["end"] - a["start"] for a in refused]),
            "admitted_ttft_ms": kit.percentiles([a["ttft_s"] for a in answers
                                                 if a["status"] == "OK"])}


def options(p) -> None:
    p.add_argument("--rate", type=float, default=150.0)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--priority", choices=list(PRIORITIES), default="interactive")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--gateway-limit", type=float, default=0.0,
                   help="envoy.max_requests_per_s: the gateway refuses beyond it (0: none)")
    p.add_argument("--client", choices=["python", "h2load"], default="python",
                   help="what sends the flood: the gRPC asyncio client, or h2load over HTTP/2")
    p.add_argument("--probe-rate", type=float, default=5.0,
                   help="--client h2load: gRPC requests a second that time first tokens")


def plot(answers: list[dict], rate: float, budget_s: float, path: Path) -> Path | None:
    """When each request was sent against how long it took: the admitted ones to
    their first token, the refused ones to their refusal; the class's budget marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t0 = min(a["start"] for a in answers)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for status, label, color in (("OK", "admitted: time to first token", "tab:blue"),
                                 ("RESOURCE_EXHAUSTED", "refused: time to the refusal",
                                  "tab:red")):
        pts = [(a["start"] - t0, (a["ttft_s"] if status == "OK" else a["end"] - a["start"]))
               for a in answers if a["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), s=4, alpha=0.5, color=color, label=f"{label} ({len(pts)})")
    ax.axhline(budget_s, color="black", linestyle="--", linewidth=1, label="TTFT budget")
    ax.set_xlabel("sent at (s)")
    ax.set_ylabel("seconds")
    ax.set_title(f"overload: {rate:g} requests/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def native_summary(rows: list[dict], sent: int) -> dict:
    """h2load's log: statuses (HTTP codes), how long the refusals (429) took to come
    back, and the admitted (200) streams' time to their end."""
    refused = [r["ms"] / 1e3 for r in rows if r["status"] == 429]
    return {"sent": sent, "statuses": dict(collections.Counter(r["status"] for r in rows)),
            "refused_share": round(len(refused) / max(1, len(rows)), 3),
            "refused_ms": kit.percentiles(refused),
            "admitted_stream_ms": kit.percentiles([r["ms"] / 1e3 for r in rows
                                                   if r["status"] == 200])}


def run_native(args, mesh) -> tuple[dict, list[dict]]:
    """h2load's flood, with the probe's answers inside it (kit.generate)."""
    if h2load.binary() is None:
        raise SystemExit("--client h2load needs h2load (Debian: apt-get install nghttp2-client)")
    body = {"prompt": [0] + [7 * j % 2900 + 5 for j in range(40)],
            "max_tokens": args.max_tokens, "stream": True, "priority": args.priority}
    proc, log_path = h2load.start(f"http://{mesh.endpoint}/v1/completions", body, args.rate,
                                  args.duration, {}, mesh.run_dir)
    try:
        probe = asyncio.run(flood(mesh.endpoint, args.probe_rate, args.duration,
                                  PRIORITIES[args.priority], args.max_tokens))
    finally:
        rows, report = h2load.finish(proc, log_path, timeout_s=args.duration + 300)
    return {"client": "h2load", "h2load_command": h2load.command(
                "URL", Path("BODY"), Path("LOG"), args.rate, args.duration, {}),
            "flood": native_summary(rows, int(args.rate * args.duration)),
            "h2load_report": report.strip().splitlines()[-12:],
            "probe": summary(probe)}, probe


def run(args) -> dict:
    native = args.client == "h2load"
    # (h2load sends one prompt: no request may reuse another's KV)
    engine = {"num_kv_blocks": 256, **({"enable_prefix_caching": False} if native else {})}
    with kit.BenchMesh(args.model, engine=engine,
                       envoy={"max_requests_per_s": args.gateway_limit}) as mesh:
        if native:
            out, answers = run_native(args, mesh)
        else:
            answers = asyncio.run(flood(mesh.endpoint, args.rate, args.duration,
                                        PRIORITIES[args.priority], args.max_tokens))
            out = summary(answers)
    if args.json:
        from llmesh.services.scheduler.policy import SchedulingPolicy
        budget = SchedulingPolicy().classes[args.priority].ttft_budget_s  # (the mesh's default)
        out["plot"] = str(plot(answers, args.rate, budget, Path(args.json).with_suffix(".png")))
    return out


SPEC = kit.Spec("overload", __doc__, options, run)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
