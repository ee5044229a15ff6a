"""Soak benchmark: a long run at a steady share of capacity, looking for drift.

    python -m llmesh.benchmarks.soak [--model DIR] [--duration 1800] [--load 0.7]
        [--warmup 120] [--sample-every 30] [--json OUT]

A one-replica mesh on the tiny model first runs a closed loop (16 clients, 30 s)
to find its capacity in requests per second; then Poisson arrivals at `--load`
of it for `--duration` seconds, every request with a known answer (the
in-process engine's tokens: half greedy, half seeded). Every `--sample-every`
seconds it records each process's RSS and the scheduler's KV blocks in use. The
report gives, per service, the RSS growth from the end of the warm-up to the
end; KV blocks still allocated once the mesh is idle (a leak); p50/p99 TTFT per
5-minute window (the drift); and failed or wrong requests.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from llmesh.benchmarks.chaos import _percentiles, known_answers
from llmesh.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2,
                       scheduler_pb2_grpc)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _stats(scheduler_port: int):
    with grpc.insecure_channel(f"127.0.0.1:{scheduler_port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=5)


class Client:
    """One request with a known answer: its status, TTFT and whether it matched."""

    def __init__(self, endpoint: str, answers):
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.prompts, self.params, self.expect = answers

    def call(self, i: int) -> dict:
        p = self.params[i]
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=self.prompts[i]),
            sampling=common_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature,
                                               top_p=p.top_p, ignore_eos=True, seed=p.seed))
        t0 = time.monotonic()
        ttft, tokens, status = None, [], "OK"
        try:
            for chunk in self.stub.Generate(req, timeout=120):
                if ttft is None and chunk.token_ids:
                    ttft = time.monotonic() - t0
                tokens += chunk.token_ids
        except grpc.RpcError as e:
            status = e.code().name
        return {"start": t0, "ttft_s": ttft, "status": status,
                "correct": status == "OK" and tokens == self.expect[i]}


def capacity(client: Client, clients: int = 16, seconds: float = 30.0) -> float:
    """Completed requests per second of a closed loop."""
    stop_at = time.monotonic() + seconds
    done = []

    def loop(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            done.append(client.call(i % len(client.prompts)))
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    return len(done) / seconds


def soak(client: Client, sup, scheduler_port: int, rate: float, duration_s: float,
         sample_every_s: float) -> dict:
    rng = random.Random(5)
    records, samples = [], []
    start = time.monotonic()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(sample_every_s):
            s = _stats(scheduler_port)
            samples.append({"t_s": time.monotonic() - start,
                            "rss_mib": {n: _rss_mib(pid) for n, pid in sup.pids().items()},
                            "kv_used_blocks": s.num_used_blocks, "running": s.num_running,
                            "waiting": s.num_waiting})

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    with ThreadPoolExecutor(256) as pool:
        futures, t = [], start
        while t < start + duration_s:
            t += rng.expovariate(rate)
            time.sleep(max(0.0, t - time.monotonic()))
            futures.append(pool.submit(client.call, rng.randrange(len(client.prompts))))
        records = [f.result() for f in futures]
    stop.set()
    thread.join()
    return {"records": records, "samples": samples, "start": start}


def summarize(run: dict, warmup_s: float, idle: scheduler_pb2.ReplicaStats) -> dict:
    records, samples = run["records"], run["samples"]
    base = next((s for s in samples if s["t_s"] >= warmup_s), samples[0])
    last = samples[-1]
    growth = {n: {"after_warmup_mib": round(base["rss_mib"][n], 1),
                  "end_mib": round(last["rss_mib"].get(n, 0.0), 1),
                  "growth_pct": round(100 * (last["rss_mib"].get(n, 0.0) / base["rss_mib"][n]
                                             - 1), 2) if base["rss_mib"][n] else None}
              for n in base["rss_mib"]}
    windows = {}
    for r in records:
        if r["ttft_s"] is not None:
            windows.setdefault(int((r["start"] - run["start"]) // 300), []).append(r["ttft_s"])
    ttft = {f"{5 * k}-{5 * (k + 1)} min": _percentiles(v) for k, v in sorted(windows.items())}
    return {"requests": len(records),
            "failed": sum(r["status"] != "OK" for r in records),
            "failed_statuses": sorted({r["status"] for r in records if r["status"] != "OK"}),
            "wrong": sum(r["status"] == "OK" and not r["correct"] for r in records),
            "rss": growth, "kv_blocks_in_use_when_idle": idle.num_used_blocks,
            "ttft_by_window": ttft, "samples": samples}


def main(argv=None) -> int:
    from llmesh.benchmarks.local_mesh import supervised_mesh, write_report
    from llmesh.mesh.default_model import default_model_dir
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.soak")
    p.add_argument("--model", help="model directory (default: the tiny preset)")
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    p.add_argument("--warmup", type=float, default=120.0, help="RSS baselines after this")
    p.add_argument("--sample-every", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=64, help="distinct prompts (cycled)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    model_dir = args.model or str(default_model_dir("tiny"))
    answers = known_answers(model_dir, args.requests)
    with supervised_mesh(model_dir, num_kv_blocks=1024) as (endpoint, sup):
        port = next(s.health_port for s in sup.specs if s.name == "scheduler-0")
        client = Client(endpoint, answers)
        pids = sup.pids()
        cap = capacity(client)
        print(f"[soak] capacity {cap:.1f} req/s; soaking at {args.load:.0%} of it "
              f"for {args.duration:.0f}s", file=sys.stderr)
        run = soak(client, sup, port, args.load * cap, args.duration, args.sample_every)
        deadline = time.monotonic() + 60
        while (s := _stats(port)).num_running + s.num_waiting and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)
        result = summarize(run, args.warmup, _stats(port))
        result["restarted"] = sorted(n for n, pid in sup.pids().items() if pid != pids[n])
    write_report(args, {"model": model_dir, "capacity_rps": cap, "rate_rps": args.load * cap,
                        **result})
    ok = not result["failed"] and not result["wrong"] and not result["kv_blocks_in_use_when_idle"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
