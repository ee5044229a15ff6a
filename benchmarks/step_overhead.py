"""What the mesh adds to each step: executors whose forward sleeps a fixed time.

    python -m llmesh.benchmarks.step_overhead [--step-ms 5] [--batch 32] [--rounds 3] [--json OUT]

On this CPU box a real forward is either much shorter than a GPU step (the tiny
model) or much longer (the bench model). Here every executor runs the
benchmark-only SleepModel: its forward sleeps `step_ms` and uses no CPU, like
a GPU step of that length, so the steps the replica completes per `step_ms`
show what scheduling, transport and reconciliation add to the critical path
(1.0 = nothing). `batch` requests decode together through Envoy and the router,
as clients would; the window measured is the one where all of them run.

Each configuration (TP 1 or 2, pipelined or serial scheduling; through Envoy,
straight to the scheduler, or the in-process Engine with the same model as the
reference) runs in turn, alternating the order per round; medians over rounds
are reported, with the StepPlan / StepResult messages per step (the critical
path: one out and one back per rank).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmesh.benchmarks.tp import _cpu_s, _stats, log
from llmesh.mesh.config import EngineLimits, EnvoyConfig, MeshConfig, ObservabilityConfig, resolve_ports
from llmesh.mesh.supervisor import Supervisor, build_specs

CONFIGS = [(1, 2), (1, 1), (2, 2), (2, 1)]  # (tensor parallel, pipeline depth)


async def _load_direct(scheduler: str, batch: int, max_tokens: int) -> int:
    """The batch as one router would send it: a Connect stream straight to the
    scheduler, one StepOutputs message back per step (no Envoy, router or client
    streams: what is left is the step's own critical path)."""
    import grpc
    from llmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
    from llmesh.services.common import convert
    from llmesh.services.common.sampling_params import SamplingParams
    params = convert.sampling_to_wire(SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                     seed=0))
    async with grpc.aio.insecure_channel(scheduler) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect()
        for i in range(batch):
            await call.write(scheduler_pb2.RouterMessage(add=scheduler_pb2.AddRequest(
                request_id=f"r{i}-{time.monotonic_ns()}", prompt_token_ids=[1, 10 + i, 20 + i],
                sampling=params, priority=2)))
        open_seqs, tokens = batch, 0
        async for outputs in call:
            for d in outputs.deltas:
                tokens += len(d.new_token_ids)
                open_seqs -= d.finish_reason != 0
            if not open_seqs:
                break
        call.cancel()
        return tokens


async def _load(endpoint: str, batch: int, max_tokens: int) -> int:
    import grpc
    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(i: int) -> int:
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=[1, 10 + i, 20 + i, 30 + i]),
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            return sum([len(c.token_ids) async for c in stub.Generate(req, timeout=600)])

        return sum(await asyncio.gather(*(one(i) for i in range(batch))))


def run_engine(model_dir: str, depth: int, step_ms: float, batch: int, max_tokens: int) -> dict:
    """The same sleeping model in the in-process Engine: the reference the mesh's
    critical path is compared with (same loop, no transport)."""
    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.engine.engine import Engine, EngineConfig
    from llmesh.services.executor.model_config import load_model_config
    from llmesh.services.executor.sleep_model import SleepModel
    engine = Engine(SleepModel(load_model_config(model_dir), step_ms / 1e3),
                    EngineConfig(num_kv_blocks=4096, max_num_seqs=batch, pipeline_depth=depth),
                    TextTokenizer(model_dir))
    engine.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    steps0 = engine.stats.num_steps
    t0 = time.perf_counter()
    engine.generate([[1, 10 + i, 20 + i] for i in range(batch)],
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    engine.close()
    steps = engine.stats.num_steps - steps0
    res = {"tensor_parallel": 1, "pipeline_depth": depth, "step_ms": step_ms, "batch": batch,
           "path": "engine", "window_s": wall, "steps": steps,
           "steps_per_step_time": steps * step_ms / 1e3 / wall,
           "wall_ms_per_step": 1e3 * wall / steps, "messages_per_step": 0.0,
           "loop_ms_per_step": 1e3 * engine.stats.schedule_s / steps, "wait_ms_per_step": None}
    log(f"[step] engine depth={depth}: {res['steps_per_step_time']:.3f} steps per {step_ms:g} ms, "
        f"{res['wall_ms_per_step']:.2f} ms/step")
    return res


def run_once(model_dir: str, tp: int, depth: int, step_ms: float, batch: int,
             max_tokens: int, direct: bool = False) -> dict:
    limits = EngineLimits(num_kv_blocks=4096, max_num_seqs=batch, max_num_batched_tokens=2048,
                          pipeline_depth=depth, bench_step_ms=step_ms)
    cfg = resolve_ports(MeshConfig(tensor_parallel=tp, engine=limits, executor_threads=1,
                                   envoy=EnvoyConfig(port=0, admin_port=0),
                                   observability=ObservabilityConfig(tracing="off")))
    endpoint = f"127.0.0.1:{cfg.envoy.port}"
    sched = cfg.replica_ports[0].scheduler
    with tempfile.TemporaryDirectory(prefix="llmesh-step-") as run_dir:
        sup = Supervisor(build_specs(cfg, model_dir, Path(run_dir)), Path(run_dir))
        sup.start(timeout_s=300)
        try:
            asyncio.run(_load(endpoint, 4, 8))  # warm every hop
            samples: list[tuple] = []
            done = threading.Event()

            def sample() -> None:  # bounded: ends with the load, or after 10 minutes
                deadline = time.monotonic() + 600
                while not done.is_set() and time.monotonic() < deadline:
                    samples.append((time.perf_counter(), _stats(sched)))
                    time.sleep(0.25)
            pids = sup.pids()
            cpu0 = {n: _cpu_s(p) for n, p in pids.items()}
            sampler = threading.Thread(target=sample)
            sampler.start()
            tokens = asyncio.run(_load_direct(f"127.0.0.1:{sched}", batch, max_tokens) if direct
                                 else _load(endpoint, batch, max_tokens))
            done.set()
            sampler.join()
            cpu = {n: _cpu_s(p) - cpu0[n] for n, p in pids.items()}
        finally:
            sup.stop()
    full = [(t, s) for t, s in samples if s.num_running == batch]
    if len(full) < 2:
        raise RuntimeError(f"TP={tp} depth={depth}: never saw all {batch} requests running")
    (t0, a), (t1, b) = full[0], full[-1]
    steps = b.num_steps - a.num_steps
    messages = (b.num_plan_messages + b.num_result_messages
                - a.num_plan_messages - a.num_result_messages)
    res = {
        "tensor_parallel": tp, "pipeline_depth": depth, "step_ms": step_ms, "batch": batch,
        "path": "scheduler" if direct else "envoy",
        "window_s": t1 - t0, "steps": steps,
        "steps_per_step_time": steps * step_ms / 1e3 / (t1 - t0),
        "wall_ms_per_step": 1e3 * (t1 - t0) / steps,
        "messages_per_step": messages / steps,
        "loop_ms_per_step": 1e3 * (b.schedule_s - a.schedule_s) / steps,
        "wait_ms_per_step": 1e3 * (b.executor_rpc_s - a.executor_rpc_s) / steps,
        "output_tokens": tokens,
        "cpu_s": cpu,
    }
    log(f"[step] {res['path']} TP={tp} depth={depth}: {res['steps_per_step_time']:.3f} steps per "
        f"{step_ms:g} ms, {res['wall_ms_per_step']:.2f} ms/step, "
        f"{res['messages_per_step']:.2f} messages/step, loop {res['loop_ms_per_step']:.2f} ms/step")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmesh.benchmarks.step_overhead")
    p.add_argument("--model", help="model directory (default: the tiny model; only its config "
                                   "and tokenizer are used)")
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="1x2,1x1,2x2,2x1", help="TPxDEPTH,...")
    p.add_argument("--paths", default="envoy,scheduler,engine",
                   help="envoy: clients stream through Envoy and the router; scheduler: one "
                        "Connect stream straight to the scheduler; engine: the in-process "
                        "Engine with the same model (TP 1 only)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from llmesh.benchmarks.machine import machine_info, versions
    from llmesh.mesh.default_model import default_model_dir
    args = parse_args(argv)
    model_dir = str(args.model or default_model_dir())
    configs = [(path, *(int(x) for x in c.split("x"))) for path in args.paths.split(",")
               for c in args.configs.split(",") if path != "engine" or c.startswith("1x")]
    runs: dict[str, list[dict]] = {f"{p}-tp{tp}-depth{d}": [] for p, tp, d in configs}
    for round_ in range(args.rounds):
        for path, tp, depth in (configs if round_ % 2 == 0 else configs[::-1]):
            runs[f"{path}-tp{tp}-depth{depth}"].append(
                run_engine(model_dir, depth, args.step_ms, args.batch, args.max_tokens)
                if path == "engine" else
                run_once(model_dir, tp, depth, args.step_ms, args.batch, args.max_tokens,
                         direct=path == "scheduler"))
    summary = {name: {k: statistics.median(r[k] for r in rs)
                      for k in ("steps_per_step_time", "wall_ms_per_step", "messages_per_step",
                                "loop_ms_per_step") if rs}
               for name, rs in runs.items()}
    report = {"machine": machine_info(), "versions": versions(), "args": vars(args),
              "runs": runs, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
