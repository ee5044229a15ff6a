"""Tensor-parallel overhead: the same workload through a TP=1 mesh and a TP=2 mesh,
alternating, in one run.

    python -m llmesh.benchmarks.tp [--model DIR] [--requests 64] [--rounds 3] [--json OUT]

On a CPU machine the two ranks share the cores the single rank had (each rank
gets cores / ranks torch threads), so the ratio is an overhead figure: what the
all-reduces, the logits gather and the token broadcast cost, not a speedup.
Reports output tokens/s, per-step forward and collective time (rank 0's view:
its wait for the other rank included), and each rank's resident memory.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llmesh.mesh.config import EngineLimits, EnvoyConfig, MeshConfig, resolve_ports
from llmesh.mesh.supervisor import Supervisor, build_specs
from llmesh.services.executor.model_config import load_model_config


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone). Unlike
    wall time this does not grow when other tenants of the machine steal cycles."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def workload(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Prompts of 16..512 tokens and outputs of 16..256, long-tailed, seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        n_prompt = int(min(512, max(16, rng.lognormvariate(0, 0.8) * 128)))
        n_out = int(min(256, max(16, rng.lognormvariate(0, 0.8) * 64)))
        out.append(([1] + [rng.randrange(8, vocab_size) for _ in range(n_prompt - 1)], n_out))
    return out


async def _drive(endpoint: str, reqs) -> tuple[float, int]:
    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(prompt, n):
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=prompt),
                sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            got = 0
            async for chunk in stub.Generate(req, timeout=1800):
                got += len(chunk.token_ids)
            return got

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n) for p, n in reqs))
        return time.perf_counter() - t0, sum(counts)


def _stats(port: int):
    from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                             timeout=10)


def run_once(model_dir: str, tp: int, reqs, warm, limits: EngineLimits, log,
             **overrides) -> dict:
    """Bring up a mesh, warm it, run `reqs` through Envoy, read the scheduler's
    step figures and the ranks' memory, bring it down."""
    cfg = resolve_ports(MeshConfig(tensor_parallel=tp, engine=limits,
                                   envoy=EnvoyConfig(port=0, admin_port=0), **overrides))
    with tempfile.TemporaryDirectory(prefix=f"llmesh-tp{tp}-") as run_dir:
        sup = Supervisor(build_specs(cfg, model_dir, Path(run_dir)), Path(run_dir))
        sup.start(timeout_s=300)
        try:
            pids = sup.pids()
            ranks = [pids[f"executor-0-{r}"] for r in range(tp)]
            endpoint = f"127.0.0.1:{cfg.envoy.port}"
            asyncio.run(_drive(endpoint, warm))
            sched = cfg.replica_ports[0].scheduler
            s0 = _stats(sched)
            cpu0 = {name: _cpu_s(pid) for name, pid in pids.items()}
            wall, tokens = asyncio.run(_drive(endpoint, reqs))
            cpu = {name: _cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
            s1 = _stats(sched)
            rss = [_rss_bytes(p) for p in ranks]
        finally:
            sup.stop()
    steps = s1.num_steps - s0.num_steps
    res = {
        "tensor_parallel": tp, "wall_s": wall, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall, "steps": steps,
        "forward_ms_per_step": 1e3 * (s1.forward_s - s0.forward_s) / steps,
        "comm_ms_per_step": 1e3 * (s1.comm_s - s0.comm_s) / steps,
        "executor_rpc_ms_per_step": 1e3 * (s1.executor_rpc_s - s0.executor_rpc_s) / steps,
        "rank_rss_bytes": rss,
        # CPU seconds each mesh process used during the measured requests
        "cpu_s": cpu, "cpu_ms_per_output_token": 1e3 * sum(cpu.values()) / tokens,
    }
    log(f"[mesh] TP={tp} {overrides or ''}: {res['output_tokens_per_s']:.1f} tok/s, {steps} steps, forward "
        f"{res['forward_ms_per_step']:.2f} ms/step of which collectives "
        f"{res['comm_ms_per_step']:.2f} ms, rank RSS "
        + ", ".join(f"{r / 2**20:.0f} MiB" for r in rss))
    return res


def ab_args(prog: str, argv=None) -> argparse.Namespace:
    """The command line shared by the alternating mesh A/B benchmarks."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--model", help="model directory (default: the bench preset)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def ab_setup(args):
    """(model dir, model config, requests, warm-up requests, engine limits) for an A/B run."""
    from llmesh.mesh.default_model import default_model_dir
    model_dir = str(args.model or default_model_dir("bench"))
    mc = load_model_config(model_dir)
    limits = EngineLimits(num_kv_blocks=4096, max_num_batched_tokens=1024, max_num_seqs=64)
    return (model_dir, mc, workload(args.requests, mc.vocab_size, args.seed),
            workload(4, mc.vocab_size, args.seed + 1), limits)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from llmesh.benchmarks.machine import machine_info, versions
    args = ab_args("llmesh.benchmarks.tp", argv)
    model_dir, mc, reqs, warm, limits = ab_setup(args)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_ in range(args.rounds):
        for tp in ((1, 2) if round_ % 2 == 0 else (2, 1)):  # alternate who goes first
            runs[tp].append(run_once(model_dir, tp, reqs, warm, limits, log))

    def med(tp, key):
        return statistics.median(r[key] for r in runs[tp])

    summary = {
        f"tp{tp}": {k: med(tp, k) for k in ("output_tokens_per_s", "forward_ms_per_step",
                                            "comm_ms_per_step", "executor_rpc_ms_per_step")}
        | {"rank_rss_mib": [round(statistics.median(r["rank_rss_bytes"][i] for r in runs[tp])
                                  / 2**20, 1) for i in range(tp)]}
        for tp in (1, 2)}
    summary["tp2_over_tp1_throughput"] = (summary["tp2"]["output_tokens_per_s"]
                                          / summary["tp1"]["output_tokens_per_s"])
    report = {"machine": machine_info(), "versions": versions(), "model_dir": model_dir,
              "model": dataclasses.asdict(mc), "requests": args.requests, "rounds": args.rounds,
              "limits": dataclasses.asdict(limits), "runs": runs, "summary": summary}
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
