"""A 10x spike against fixed replica counts and the autoscaler.

    python -m llmesh.benchmarks.autoscale [--base 3] [--spike 30] [--json OUT]

Replicas run the benchmark-only sleeping model (each step sleeps 20 ms and uses
no CPU, like a GPU step), so on this 2-core box N replicas really serve N times
one (4 slots, 20-token answers: about 10 req/s each). The load, open-loop
interactive gRPC requests through Envoy: `base` req/s for 8 s, `spike` req/s
for 10 s, `base` again for 12 s. Each target is a mesh brought up with
`llmesh up --detach`: fixed 1 replica, fixed 4, and the autoscaler (1 to 4,
with a warm pool of 1, and cold with none). Reported per target: goodput
(requests answered with TTFT <= 2 s, per second of the run), refusals, TTFT
p50 / p99 of the answered, and for the autoscaler its decisions and each
replica's time to join (from the warm pool, or cold: the model loads).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llmesh.benchmarks.local_mesh import write_report
from llmesh.benchmarks.overload import flood

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 2.0


def _targets(max_replicas: int) -> dict:
    auto = {"enabled": True, "min_replicas": 1, "max_replicas": max_replicas, "tick_s": 0.5,
            "cooldown_s": 1.5, "scale_in_after_s": 10, "record_signals": True}
    return {"fixed-1": ({"replicas": 1}, None),
            f"fixed-{max_replicas}": ({"replicas": max_replicas}, None),
            "autoscaler-warm": ({"replicas": 1}, {**auto, "warm_pool": 1}),
            "autoscaler-cold": ({"replicas": 1}, {**auto, "warm_pool": 0})}


async def _phases(endpoint: str, phases: list[tuple[float, float]]) -> list:
    """Each phase's flood starts when the previous one's arrivals end (answers
    may still be streaming)."""
    tasks, results = [], []
    for rate, duration in phases:
        tasks.append(asyncio.ensure_future(flood(endpoint, rate, duration, 1, 20)))
        await asyncio.sleep(duration)
    for t in tasks:
        results += await t
    return results


def _run(name: str, topology: dict, autoscaler, model_dir: str, phases, out_dir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"llmesh-autoscale-{name}-"))
    cfg = {"model": model_dir, "run_dir": str(run_dir), **topology,
           "envoy": {"port": 0, "admin_port": 0},
           "observability": {"tracing": "off"}, "routing": {"policy": "least_loaded"},
           "engine": {"num_kv_blocks": 256, "probe_interval_s": 0, "bench_step_ms": 20,
                      "max_num_seqs": 4}}
    if autoscaler:
        cfg["autoscaler"] = autoscaler
    path = run_dir / "mesh.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmesh.mesh.cli", *args, "--config", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    up = cli("up", "--detach")
    if up.returncode != 0:
        raise RuntimeError(f"{name}: llmesh up failed: {up.stderr}")
    try:
        state = json.loads((run_dir / "state.json").read_text())
        if autoscaler and autoscaler["warm_pool"]:  # the pool is full before the load
            until = time.monotonic() + 120
            while len(state.get("warm_pool", ())) < autoscaler["warm_pool"] and \
                    time.monotonic() < until:
                time.sleep(0.5)
                state = json.loads((run_dir / "state.json").read_text())
        t0 = time.monotonic()
        results = asyncio.run(_phases(state["endpoint"], phases))
        wall = time.monotonic() - t0
        state = json.loads((run_dir / "state.json").read_text())
    finally:
        cli("down")
    ttfts = sorted(t for s, t, _ in results if s == "OK" and t is not None)
    good = sum(t <= BUDGET_S for t in ttfts)
    out = {"requests": len(results), "answered": len(ttfts), "within_budget": good,
           "refused": sum(s == "RESOURCE_EXHAUSTED" for s, _, _ in results),
           "failed": sum(s not in ("OK", "RESOURCE_EXHAUSTED") for s, _, _ in results),
           "goodput_rps": round(good / wall, 2),
           "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3) if ttfts else None,
           "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3)
           if ttfts else None}
    if autoscaler:
        decisions = [json.loads(line) for line in
                     (run_dir / "autoscaler.jsonl").read_text().splitlines()] \
            if (run_dir / "autoscaler.jsonl").exists() else []
        out["decisions"] = [{k: d[k] for k in ("t", "action", "current", "desired", "rule",
                                                "reason")} for d in decisions]
        out["joins"] = state.get("joins", [])
        signals = run_dir / "autoscaler-signals.jsonl"
        if signals.exists():
            (out_dir / f"autoscale-signals-{name}.jsonl").write_text(signals.read_text())
    return out


def main(argv=None) -> int:
    from llmesh.mesh.default_model import make_tiny
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.autoscale")
    p.add_argument("--base", type=float, default=3.0)
    p.add_argument("--spike", type=float, default=30.0)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--targets", default="", help="comma-separated subset")
    p.add_argument("--json")
    args = p.parse_args(argv)
    model_dir = str(make_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    phases = [(args.base, 8.0), (args.spike, 10.0), (args.base, 12.0)]
    out_dir = Path(args.json).parent if args.json else Path(tempfile.mkdtemp())
    targets = _targets(args.max_replicas)
    chosen = args.targets.split(",") if args.targets else list(targets)
    results = {name: _run(name, *targets[name], model_dir, phases, out_dir) for name in chosen}
    write_report(args, {"phases_rps_s": phases, "ttft_budget_s": BUDGET_S, "targets": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
