"""Soak benchmark: a long run at a steady share of capacity, looking for drift.

A one-replica mesh on the tiny model first runs a closed loop (16 clients, 30 s)
to find its capacity in requests per second; then Poisson arrivals at `--load`
of it for `--duration` seconds, every request with a known answer (the
in-process engine's tokens: half greedy, half seeded; chaos.known_answers).
Every `--sample-every` seconds it records each process's RSS and the
scheduler's KV blocks in use. The report gives, per service, the RSS growth
from the end of the warm-up to the end; KV blocks still allocated once the mesh
is idle (a leak); TTFT percentiles per 5-minute window (the drift); and failed
or wrong requests.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

from llmesh.benchmarks import kit
from llmesh.benchmarks.chaos import known_answers


def soak(mesh: kit.BenchMesh, make, rate: float, duration_s: float,
         sample_every_s: float) -> dict:
    samples, start, stop = [], time.monotonic(), threading.Event()

    def sampler() -> None:
        while not stop.wait(sample_every_s):
            s = mesh.stats()
            samples.append({"t_s": time.monotonic() - start, "rss_mib": mesh.rss_mib(),
                            "kv_used_blocks": s.num_used_blocks, "running": s.num_running,
                            "waiting": s.num_waiting})

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    answers = asyncio.run(kit.load(mesh.endpoint, make, duration_s=duration_s, rate=rate,
                                   seed=5, timeout_s=120))
    stop.set()
    thread.join()
    return {"answers": answers, "samples": samples, "start": start}


def summarize(run: dict, expect: list, warmup_s: float, idle_blocks: int) -> dict:
    """`expect[i]`: the known answer of the i-th request sent."""
    answers, samples = run["answers"], run["samples"]
    base = next((s for s in samples if s["t_s"] >= warmup_s), samples[0])
    last = samples[-1]
    growth = {n: {"after_warmup_mib": round(mib, 1),
                  "end_mib": round(last["rss_mib"].get(n, 0.0), 1),
                  "growth_pct": round(100 * (last["rss_mib"].get(n, 0.0) / mib - 1), 2)
                  if mib else None} for n, mib in base["rss_mib"].items()}
    windows: dict[int, list] = {}
    for a in answers:
        windows.setdefault(int((a["start"] - run["start"]) // 300), []).append(a["ttft_s"])
    failed = [a for a in answers if a["status"] != "OK"]
    return {"requests": len(answers), "failed": len(failed),
            "failed_statuses": sorted({a["status"] for a in failed}),
            "wrong": sum(a["status"] == "OK" and a["tokens"] != e for a, e in zip(answers, expect)),
            "rss": growth, "kv_blocks_in_use_when_idle": idle_blocks,
            "ttft_by_window": {f"{5 * k}-{5 * (k + 1)} min": kit.percentiles(v)
                               for k, v in sorted(windows.items())},
            "samples": samples}


def options(p) -> None:
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    p.add_argument("--warmup", type=float, default=120.0, help="RSS baselines after this")
    p.add_argument("--sample-every", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=64, help="distinct prompts (cycled)")


def run(args) -> dict:
    prompts, params, expect = known_answers(args.model, args.requests)

    def pick(i: int) -> int:  # the prompt of request i (seeded)
        return random.Random(f"5/{i}").randrange(len(prompts))

    def make(i: int):
        p = params[pick(i)]
        return kit.request(prompts[pick(i)], p.max_tokens, temperature=p.temperature,
                           top_p=p.top_p, seed=p.seed)
    with kit.BenchMesh(args.model, engine={"num_kv_blocks": 1024}) as mesh:
        pids = mesh.pids()
        cap = len(asyncio.run(kit.load(mesh.endpoint, make, duration_s=30, concurrency=16,
                                       timeout_s=120))) / 30
        kit.log(f"[soak] capacity {cap:.1f} req/s; soaking at {args.load:.0%} of it "
                f"for {args.duration:.0f}s")
        result = soak(mesh, make, args.load * cap, args.duration, args.sample_every)
        deadline = time.monotonic() + 60
        while (s := mesh.stats()).num_running + s.num_waiting and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)
        out = summarize(result, [expect[pick(i)] for i in range(len(result["answers"]))],
                        args.warmup, mesh.stats().num_used_blocks)
        out["restarted"] = sorted(n for n, pid in mesh.pids().items() if pid != pids[n])
    return {"capacity_rps": cap, "rate_rps": args.load * cap, **out}


SPEC = kit.Spec("soak", __doc__, options, run, passed=lambda r: not (
    r["failed"] or r["wrong"] or r["kv_blocks_in_use_when_idle"]))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
