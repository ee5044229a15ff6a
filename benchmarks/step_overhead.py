"""What the mesh adds to each step: executors whose forward sleeps a fixed time.

On this CPU box a real forward is either much shorter than a GPU step (the tiny
model) or much longer (the bench model). Here every executor runs the
benchmark-only SleepModel: its forward sleeps `--step-ms` and uses no CPU, like
a GPU step of that length, so the steps the replica completes per step_ms
show what scheduling, transport and reconciliation add to the critical path
(1.0 = nothing). `--batch` requests decode together through Envoy and the
router, as clients would; the window measured is the one where all of them run.

Each configuration (TP 1 or 2, pipelined or serial scheduling; through Envoy,
straight to the scheduler, or the in-process Engine with the same model as the
reference) runs in turn, alternating the order per round; medians over rounds
are reported, with the StepPlan / StepResult messages per step (the critical
path: one out and one back per rank).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

from llmesh.benchmarks import kit
from llmesh.benchmarks.loop_overhead import sleep_engine, timed

FIGURES = ("steps_per_step_time", "wall_ms_per_step", "messages_per_step", "loop_ms_per_step")


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


def _load(endpoint: str, batch: int, max_tokens: int) -> int:
    return kit.num_tokens(asyncio.run(kit.load(endpoint, lambda i: kit.request(
        [1, 10 + i, 20 + i, 30 + i], max_tokens), count=batch)))


def run_engine(args, depth: int) -> dict:
    """The same sleeping model in the in-process Engine: the reference the mesh's
    critical path is compared with (same loop, no transport)."""
    engine = sleep_engine(args.model, args.step_ms, tokenizer=True, num_kv_blocks=4096,
                          max_num_seqs=args.batch, pipeline_depth=depth)
    timed(engine, [[1, 2, 3]] * 4, 8)
    schedule0 = engine.stats.schedule_s
    wall, steps = timed(engine, [[1, 10 + i, 20 + i] for i in range(args.batch)],
                        args.max_tokens)
    engine.close()
    return {"window_s": wall, "steps": steps, "messages_per_step": 0.0,
            "loop_ms_per_step": 1e3 * (engine.stats.schedule_s - schedule0) / steps,
            "wait_ms_per_step": None}


def run_mesh(args, tp: int, depth: int, direct: bool) -> dict:
    with kit.BenchMesh(args.model, name="step", tensor_parallel=tp, executor_threads=1,
                       observability={"tracing": "off", "metrics": True},
                       engine={"num_kv_blocks": 4096, "max_num_seqs": args.batch,
                               "max_num_batched_tokens": 2048, "pipeline_depth": depth,
                               "bench_step_ms": args.step_ms}) as mesh:
        _load(mesh.endpoint, 4, 8)  # warm every hop
        samples: list[tuple] = []
        done = threading.Event()

        def sample() -> None:  # bounded: ends with the load, or after 10 minutes
            deadline = time.monotonic() + 600
            while not done.is_set() and time.monotonic() < deadline:
                samples.append((time.perf_counter(), mesh.stats()))
                time.sleep(0.25)
        cpu0 = mesh.cpu_s()
        sampler = threading.Thread(target=sample)
        sampler.start()
        tokens = asyncio.run(_load_direct(mesh.schedulers[0], args.batch, args.max_tokens)) \
            if direct else _load(mesh.endpoint, args.batch, args.max_tokens)
        done.set()
        sampler.join()
        cpu = {n: v - cpu0.get(n, 0.0) for n, v in mesh.cpu_s().items()}
    full = [(t, s) for t, s in samples if s.num_running == args.batch]
    if len(full) < 2:
        raise RuntimeError(f"TP={tp} depth={depth}: never saw all {args.batch} requests running")
    (t0, a), (t1, b) = full[0], full[-1]
    steps = b.num_steps - a.num_steps
    return {"window_s": t1 - t0, "steps": steps,
            "messages_per_step": (b.num_plan_messages + b.num_result_messages
                                  - a.num_plan_messages - a.num_result_messages) / steps,
            "loop_ms_per_step": 1e3 * (b.schedule_s - a.schedule_s) / steps,
            "wait_ms_per_step": 1e3 * (b.executor_rpc_s - a.executor_rpc_s) / steps,
            "output_tokens": tokens, "cpu_s": cpu}


def run_once(args, path: str, tp: int, depth: int) -> dict:
    res = run_engine(args, depth) if path == "engine" else \
        run_mesh(args, tp, depth, direct=path == "scheduler")
    res.update({"path": path, "tensor_parallel": tp, "pipeline_depth": depth,
                "steps_per_step_time": res["steps"] * args.step_ms / 1e3 / res["window_s"],
                "wall_ms_per_step": 1e3 * res["window_s"] / res["steps"]})
    kit.log(f"[step] {path} TP={tp} depth={depth}: {res['steps_per_step_time']:.3f} steps per "
            f"{args.step_ms:g} ms, {res['wall_ms_per_step']:.2f} ms/step, "
            f"{res['messages_per_step']:.2f} messages/step, loop {res['loop_ms_per_step']:.2f} ms/step")
    return res


def options(p) -> None:
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="1x2,1x1,2x2,2x1", help="TPxDEPTH,...")
    p.add_argument("--paths", default="envoy,scheduler,engine",
                   help="envoy: clients stream through Envoy and the router; scheduler: one "
                        "Connect stream straight to the scheduler; engine: the in-process "
                        "Engine with the same model (TP 1 only)")


def run(args) -> dict:
    configs = [(path, *(int(x) for x in c.split("x"))) for path in args.paths.split(",")
               for c in args.configs.split(",") if path != "engine" or c.startswith("1x")]
    runs = kit.alternate(args.rounds, configs, lambda c: run_once(args, *c))
    runs = {f"{p}-tp{tp}-depth{d}": rs for (p, tp, d), rs in runs.items()}
    return {"runs": runs, "summary": {name: kit.medians(rs, FIGURES) for name, rs in runs.items()}}


SPEC = kit.Spec("step_overhead", __doc__, options, run,
                table=lambda report: json.dumps(report["summary"], indent=2))

if __name__ == "__main__":
    raise SystemExit(kit.main(SPEC))
