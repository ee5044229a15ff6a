"""Soak benchmark: a long run of mixed traffic with faults, looking for drift.

A one-replica mesh on the tiny model first runs a closed loop (16 clients, 30 s)
to find its capacity in requests per second; then Poisson arrivals at `--load`
of it for `--duration` seconds, of four kinds (`soak_traffic.py`: streams,
streams the client cancels, n = 2, JSON-constrained), every one with a known
answer. Every `--kill-every` seconds one process is killed (SIGKILL, in turn:
`--victims`; none in the last `--quiet-end` seconds) and the supervisor restarts
it. Every `--sample-every` seconds it
records each process's RSS and open file descriptors and the scheduler's KV
blocks in use. The report gives, per process, RSS and descriptor growth over its
last incarnation (from `--warmup` after its start to the end); KV blocks still
held once the mesh is idle; TTFT percentiles per 5-minute window; failed and
wrong requests per kind; and a plot of RSS, descriptors and KV blocks over time
with the kills marked (`--json`'s path with `.png`).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
from pathlib import Path

from llmesh.benchmarks import kit, soak_traffic
from llmesh.benchmarks.chaos import known_answers

VICTIMS = "executor-0-0,scheduler-0,tokenizer-0,kvcache"


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


async def drive(endpoint: str, make, duration_s: float, rate: float | None = None,
                concurrency: int | None = None, timeout_s: float = 120) -> list[dict]:
    """Requests make(0), make(1), ... for `duration_s`: `concurrency` closed-loop
    clients, or Poisson arrivals at `rate`; their answers in the order sent."""
    import grpc
    from llmesh.v1 import inference_pb2_grpc
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        end, numbers = time.monotonic() + duration_s, itertools.count()
        if concurrency:
            done = []

            async def client() -> None:
                while time.monotonic() < end:
                    i = next(numbers)
                    kind, req = make(i)
                    done.append((i, await soak_traffic.call(stub, kind, req, timeout_s)))
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return [a for _, a in sorted(done, key=lambda d: d[0])]
        rng, tasks, t = random.Random(5), [], time.monotonic()
        while (t := t + rng.expovariate(rate)) < end:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            kind, req = make(next(numbers))
            tasks.append(asyncio.ensure_future(soak_traffic.call(stub, kind, req, timeout_s)))
        return list(await asyncio.gather(*tasks))


def soak(mesh: kit.BenchMesh, make, rate: float, args) -> dict:
    samples, kills, start, stop = [], [], time.monotonic(), threading.Event()

    def sampler() -> None:
        import grpc
        while not stop.wait(args.sample_every):
            try:
                s = mesh.stats()
            except grpc.RpcError:  # (the scheduler restarting after a kill)
                continue
            rss = {n: mib for n, mib in mesh.rss_mib().items() if mib}  # (the living)
            pids = {n: p for n, p in mesh.pids().items() if n in rss}
            samples.append({"t_s": time.monotonic() - start, "pids": pids, "rss_mib": rss,
                            "fds": {n: open_fds(p) for n, p in pids.items()},
                            "kv_used_blocks": s.num_used_blocks, "running": s.num_running})

    def killer() -> None:
        for victim in itertools.cycle(args.victims.split(",")):
            if stop.wait(args.kill_every) \
                    or time.monotonic() - start > args.duration - args.quiet_end:
                return  # (the last stretch has no kills: every process's last life is long)
            pid = mesh.pids().get(victim)
            if pid:
                os.kill(pid, signal.SIGKILL)
                kills.append({"t_s": time.monotonic() - start, "victim": victim, "pid": pid})
                kit.log(f"[soak] killed {victim} at {kills[-1]['t_s']:.0f}s")
    threads = [threading.Thread(target=sampler, daemon=True)]
    if args.kill_every:
        threads.append(threading.Thread(target=killer, daemon=True))
    for t in threads:
        t.start()
    answers = asyncio.run(drive(mesh.endpoint, make, args.duration, rate=rate))
    stop.set()
    for t in threads:
        t.join()
    return {"answers": answers, "samples": samples, "kills": kills, "start": start}


def _growth(samples: list[dict], key: str, warmup_s: float) -> dict:
    """Per process: its value `warmup_s` into its last incarnation, at the end, growth."""
    out = {}
    for name, pid in samples[-1]["pids"].items():
        mine = [s for s in samples if s["pids"].get(name) == pid]
        born, last = mine[0]["t_s"], mine[-1]
        base = next((s for s in mine if s["t_s"] >= born + warmup_s), None)
        if base is None or not base[key].get(name):
            out[name] = {"incarnation_from_s": round(born), "note": "too young to judge"}
            continue
        a, b = base[key][name], last[key][name]
        out[name] = {"incarnation_from_s": round(born), "from_s": round(base["t_s"]),
                     "base": round(a, 1), "end": round(b, 1), "growth_pct": round(100 * (b / a - 1), 2)}
    return out


def summarize(run: dict, expect: list, warmup_s: float, idle_blocks: int) -> dict:
    """`expect[i]`: the known choices of the i-th request sent."""
    answers, samples = run["answers"], run["samples"]
    windows: dict[int, list] = {}
    for a in answers:
        if a["ttft_s"] is not None and a["kind"] != "n2":
            windows.setdefault(int((a["start"] - run["start"]) // 300), []).append(a["ttft_s"])
    by_kind = {}
    for a, e in zip(answers, expect):
        k = by_kind.setdefault(a["kind"], {"requests": 0, "failed": 0, "wrong": 0, "statuses": {}})
        k["requests"] += 1
        k["statuses"][a["status"]] = k["statuses"].get(a["status"], 0) + 1
        k["failed"] += a["status"] != "OK"
        k["wrong"] += a["status"] == "OK" and a["choices"] != e
    return {"requests": len(answers), "failed": sum(k["failed"] for k in by_kind.values()),
            "wrong": sum(k["wrong"] for k in by_kind.values()), "by_kind": by_kind,
            "rss_mib": _growth(samples, "rss_mib", warmup_s),
            "fds": _growth(samples, "fds", warmup_s),
            "kv_blocks_in_use_when_idle": idle_blocks, "kills": run["kills"],
            "ttft_by_window": {f"{5 * k}-{5 * (k + 1)} min": kit.percentiles(v)
                               for k, v in sorted(windows.items())},
            "samples": [{k: v for k, v in s.items() if k != "pids"} for s in samples]}


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = report["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    t = [s["t_s"] / 60 for s in samples]
    for ax, key, label in ((axes[0], "rss_mib", "RSS (MiB)"), (axes[1], "fds", "open fds")):
        for name in sorted(samples[-1][key]):
            ax.plot(t, [s[key].get(name) for s in samples], label=name)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7, ncol=3)
    axes[2].plot(t, [s["kv_used_blocks"] for s in samples], label="KV blocks in use")
    axes[2].set_ylabel("KV blocks in use")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for k in report["kills"]:
            ax.axvline(k["t_s"] / 60, color="red", alpha=0.3)
    axes[0].set_title("soak: RSS, descriptors and KV blocks (red: a kill)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def options(p) -> None:
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    p.add_argument("--warmup", type=float, default=120.0,
                   help="a process's baselines are taken this long after its (re)start")
    p.add_argument("--sample-every", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=64, help="distinct prompts (cycled)")
    p.add_argument("--kill-every", type=float, default=300.0, help="0: no kills")
    p.add_argument("--victims", default=VICTIMS, help="processes killed in turn")
    p.add_argument("--quiet-end", type=float, default=600.0,
                   help="no kills in the run's last this many seconds")


def run(args) -> dict:
    prompts, params, _ = known_answers(args.model, args.requests)
    known = soak_traffic.known_answers(args.model, prompts, params)

    def pick(i: int) -> int:  # the prompt of request i (seeded)
        return random.Random(f"5/{i}").randrange(len(prompts))

    def make(i: int):
        kind = soak_traffic.kind_of(i)
        return kind, soak_traffic.request(kind, prompts[pick(i)], params[pick(i)])
    with kit.BenchMesh(args.model, engine={"num_kv_blocks": 1024}) as mesh:
        cap = len(asyncio.run(drive(mesh.endpoint, make, 30, concurrency=16))) / 30
        kit.log(f"[soak] capacity {cap:.1f} req/s; soaking at {args.load:.0%} of it "
                f"for {args.duration:.0f}s, a kill every {args.kill_every:g}s")
        result = soak(mesh, make, args.load * cap, args)
        deadline = time.monotonic() + 60
        while (s := mesh.stats()).num_running + s.num_waiting and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)
        expect = [known[soak_traffic.kind_of(i)][pick(i)] for i in range(len(result["answers"]))]
        out = summarize(result, expect, args.warmup, mesh.stats().num_used_blocks)
    report = {"capacity_rps": cap, "rate_rps": args.load * cap, **out}
    if args.json:
        report["plot"] = str(plot(report, Path(args.json).with_suffix(".png")))
    return report


SPEC = kit.Spec("soak", __doc__, options, run, passed=lambda r: not (
    r["failed"] or r["wrong"] or r["kv_blocks_in_use_when_idle"]))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
