"""A 10x spike against fixed replica counts and the autoscaler.

Replicas run the benchmark-only sleeping model (each step sleeps 20 ms and uses
no CPU, like a GPU step), so on this 2-core box N replicas really serve N times
one (4 slots, 20-token answers: about 10 req/s each). The load, open-loop
interactive gRPC requests through Envoy: `base` req/s for 8 s, `spike` req/s
for 10 s, `base` again for 12 s. Targets: fixed 1 replica, fixed
`--max-replicas`, and the autoscaler (1 to max, with a warm pool of 1, and cold
with none). Reported per target: goodput (requests answered with TTFT <= 2 s,
per second of the run), refusals, TTFT percentiles of the answered, and for the
autoscaler its decisions and each replica's time to join (from the warm pool,
or cold: the model loads). The autoscaler's signals go beside the results file
(autoscale-signals-NAME.jsonl).
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from llmesh.benchmarks import kit
from llmesh.benchmarks.overload import flood

BUDGET_S = 2.0
ENGINE = {"num_kv_blocks": 256, "probe_interval_s": 0, "bench_step_ms": 20, "max_num_seqs": 4}


def targets(max_replicas: int) -> dict:
    auto = {"enabled": True, "min_replicas": 1, "max_replicas": max_replicas, "tick_s": 0.5,
            "cooldown_s": 1.5, "scale_in_after_s": 10, "record_signals": True}
    return {"fixed-1": {"replicas": 1}, f"fixed-{max_replicas}": {"replicas": max_replicas},
            "autoscaler-warm": {"autoscaler": {**auto, "warm_pool": 1}},
            "autoscaler-cold": {"autoscaler": {**auto, "warm_pool": 0}}}


async def phases(endpoint: str, steps: list[tuple[float, float]]) -> list[dict]:
    """Each phase's flood starts when the previous one's arrivals end (answers may
    still be streaming)."""
    tasks = []
    for rate, duration in steps:
        tasks.append(asyncio.ensure_future(flood(endpoint, rate, duration, 1, 20)))
        await asyncio.sleep(duration)
    return [a for t in tasks for a in await t]


def run_target(name: str, overrides: dict, model_dir: str, steps, out_dir: Path) -> dict:
    with kit.BenchMesh(model_dir, name=f"autoscale-{name}", engine=ENGINE,
                       routing={"policy": "least_loaded"}, observability={"metrics": True},
                       **overrides) as mesh:
        pool = overrides.get("autoscaler", {}).get("warm_pool", 0)
        until = time.monotonic() + 120
        while pool and len(mesh.state().get("warm_pool", ())) < pool \
                and time.monotonic() < until:  # the pool is full before the load
            time.sleep(0.5)
        t0 = time.monotonic()
        answers = asyncio.run(phases(mesh.endpoint, steps))
        wall = time.monotonic() - t0
        ttfts = [a["ttft_s"] for a in answers if a["status"] == "OK"]
        good = sum(t <= BUDGET_S for t in ttfts)
        out = {"requests": len(answers), "answered": len(ttfts), "within_budget": good,
               "refused": sum(a["status"] == "RESOURCE_EXHAUSTED" for a in answers),
               "failed": sum(a["status"] not in ("OK", "RESOURCE_EXHAUSTED") for a in answers),
               "goodput_rps": round(good / wall, 2), "ttft_ms": kit.percentiles(ttfts)}
        if mesh.detached:
            log = mesh.run_dir / "autoscaler.jsonl"
            out["decisions"] = [{k: d[k] for k in ("t", "action", "current", "desired", "rule",
                                                   "reason")}
                                for d in map(json.loads, log.read_text().splitlines())] \
                if log.exists() else []
            out["joins"] = mesh.state().get("joins", [])
            signals = mesh.run_dir / "autoscaler-signals.jsonl"
            if signals.exists():
                (out_dir / f"autoscale-signals-{name}.jsonl").write_text(signals.read_text())
    return out


def options(p) -> None:
    p.add_argument("--base", type=float, default=3.0)
    p.add_argument("--spike", type=float, default=30.0)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--targets", default="", help="comma-separated subset")


def run(args) -> dict:
    steps = [(args.base, 8.0), (args.spike, 10.0), (args.base, 12.0)]
    out_dir = Path(args.json).parent if args.json else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    every = targets(args.max_replicas)
    chosen = args.targets.split(",") if args.targets else list(every)
    return {"phases_rps_s": steps, "ttft_budget_s": BUDGET_S,
            "targets": {n: run_target(n, every[n], args.model, steps, out_dir) for n in chosen}}


SPEC = kit.Spec("autoscale", __doc__, options, run)

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
