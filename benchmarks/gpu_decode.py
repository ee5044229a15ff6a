"""`llmesh bench gpu`, parts 1 and 2 (gpu_bench.py describes them): decode steps
through the engine's ModelRunner against the memory roofline, and the profile split of
one batch's steps. The caller keeps the engine's own loop out of the runner meanwhile.
"""
from __future__ import annotations

import itertools
import math
import random
import statistics
import time

from llmesh.benchmarks.kit import log

PEAK_TBS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35}  # spec sheets
ISSUE_TABLE_TBS = 4.3  # what issue 14's first table divided by (an H200's measured copy rate)


def spec_bandwidth(gpu_name: str | None) -> tuple[float, str] | None:
    """(TB/s, source) from the spec sheet of a GPU named so, or None if unknown."""
    for key, tbs in PEAK_TBS.items():  # (most specific first)
        if gpu_name and key in gpu_name:
            return tbs, f"{key} spec sheet"
    return None


def pick_bandwidth(device: str, override_tbs: float | None) -> dict:
    """Peak memory bandwidth: --bandwidth-tbs, else the GPU's spec sheet, else (a CPU or
    an unknown GPU) the measured copy rate; the measured copy rate is recorded always."""
    import torch

    from llmesh.benchmarks import machine
    dev = torch.device(device)
    measured = machine.measure_memory_bandwidth((256 if dev.type == "cuda" else 64) * 2**20,
                                                device=device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    out = {"gpu": gpu, "measured_copy_bytes_per_s": measured["bytes_per_s"],
           "issue_table_tbs": ISSUE_TABLE_TBS}
    spec = spec_bandwidth(gpu)
    if override_tbs:
        return {**out, "bytes_per_s": override_tbs * 1e12, "source": "--bandwidth-tbs"}
    if spec:
        return {**out, "bytes_per_s": spec[0] * 1e12, "source": spec[1]}
    return {**out, "bytes_per_s": measured["bytes_per_s"],
            "source": "measured copy (read + write) / time"}


def decode_sweep(engine, batches, prompt_tokens, args, bandwidth, weight_bytes, kv_per_token,
                 vocab_size):
    """Decode steps through `engine.runner`, one batch size at a time (see the module doc)."""
    import torch

    from llmesh.services.common.sampling_params import SamplingParams
    from llmesh.services.common.step_plan import NewSequence, ScheduledSequence, StepPlan
    runner, kv = engine.runner, engine.kv
    cuda = runner.device.type == "cuda"
    step_ids = itertools.count(1 << 40)
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    rng = random.Random(f"bench-gpu-decode/{args.seed}")
    budget = max(prompt_tokens, args.max_batched_tokens)
    profile_batch = args.profile_batch or (64 if 64 in batches else max(batches))
    rows, profile = [], None

    def sync():
        if cuda:
            torch.cuda.synchronize(runner.device)

    for batch in batches:
        ids = [f"bench-gpu-{batch}-{i}" for i in range(batch)]
        done = {}  # tokens computed, per sequence
        prefill_s, prefill_tokens = [], []
        try:
            for group in _chunks(ids, max(1, budget // prompt_tokens)):  # prefill (timed too)
                plan = StepPlan(step_id=next(step_ids))
                for sid in group:
                    if kv.allocate_slots(sid, prompt_tokens, 0) is None:
                        raise RuntimeError(f"KV blocks ran out at batch {batch}")
                    blocks = list(kv.block_ids(sid))
                    plan.new.append(NewSequence(sid, [rng.randrange(vocab_size) for _ in
                                                      range(prompt_tokens)],
                                                prompt_tokens, params, 0, 0, blocks))
                    plan.scheduled.append(ScheduledSequence(sid, prompt_tokens, len(blocks), []))
                    done[sid] = prompt_tokens
                sync()
                t0 = time.perf_counter()
                runner.execute(plan)
                sync()
                prefill_s.append(time.perf_counter() - t0)
                prefill_tokens.append(len(group) * prompt_tokens)

            def decode_plan():
                plan = StepPlan(step_id=next(step_ids))
                for sid in ids:
                    alloc = kv.allocate_slots(sid, done[sid] + 1, done[sid])
                    if alloc is None:
                        raise RuntimeError(f"KV blocks ran out at batch {batch}")
                    plan.scheduled.append(ScheduledSequence(sid, 1, alloc.num_kept_blocks,
                                                            alloc.new_block_ids))
                    done[sid] += 1
                return plan, sum(done.values())  # (tokens read: each context, its new one too)

            for _ in range(args.warmup_steps):
                runner.execute(decode_plan()[0])
            plans = [decode_plan() for _ in range(args.decode_steps)]  # built outside the timing
            wall, gpu, fwd, smp = [], [], [], []
            sync()
            t_loop = time.perf_counter()
            for plan, _ in plans:
                t0 = time.perf_counter()
                res = runner.execute(plan)
                wall.append(time.perf_counter() - t0)
                gpu.append(res.forward_s + res.sample_s)
                fwd.append(res.forward_s)
                smp.append(res.sample_s)
            sync()
            loop_s = time.perf_counter() - t_loop
            step_s = statistics.median(wall)
            kv_bytes = statistics.fmean(t for _, t in plans) * kv_per_token
            roof_s = (weight_bytes + kv_bytes) / bandwidth["bytes_per_s"]
            rows.append({"batch": batch, "steps": len(wall), "step_ms": 1e3 * step_s,
                         "step_ms_min": 1e3 * min(wall),
                         "loop_ms_per_step": 1e3 * loop_s / len(wall),
                         "gpu_ms": 1e3 * statistics.median(gpu),
                         "forward_ms": 1e3 * statistics.median(fwd),
                         "sample_ms": 1e3 * statistics.median(smp),
                         "context_tokens": statistics.fmean(t for _, t in plans) / batch,
                         "kv_bytes": kv_bytes, "weight_bytes": weight_bytes,
                         "roofline_ms": 1e3 * roof_s, "share": roof_s / step_s,
                         # the batch's prefill steps (the first one pays any warm-up)
                         "prefill_ms": [round(1e3 * t, 3) for t in prefill_s],
                         "prefill_tokens": prefill_tokens,
                         "tokens_per_s": batch / step_s})
            log(f"[bench gpu] decode batch {batch}: {1e3 * step_s:.3f} ms/step, roofline "
                 f"{1e3 * roof_s:.3f} ms ({100 * roof_s / step_s:.1f}%)")
            if batch == profile_batch:
                profile = _profile(runner, [decode_plan()[0] for _ in range(args.profile_steps)],
                                   rows[-1], sync)
        finally:
            runner.execute(StepPlan(step_id=next(step_ids), finished_seq_ids=ids))
            for sid in ids:
                kv.free(sid)
    return rows, profile


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _profile(runner, plans, row, sync) -> dict:
    """Wall against GPU time per step at one batch; the GPU's busy time from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    out = {"batch": row["batch"], "wall_ms": row["step_ms"], "gpu_event_ms": row["gpu_ms"],
           "gpu_event_over_wall": row["gpu_ms"] / row["step_ms"],
           "note": "gpu_event_ms: the runner's forward_s + sample_s (CUDA events around the "
                   "step on a GPU, idle gaps included; wall time on a CPU). kernel_ms: union "
                   "of the device's kernels and copies per step under torch.profiler; "
                   "host_gap_ms = wall_ms - kernel_ms."}
    cuda = runner.device.type == "cuda"
    try:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for plan in plans:
                runner.execute(plan)
            sync()
            profiled_s = time.perf_counter() - t0
        n = max(len(plans), 1)
        events = prof.events()
        device = [e for e in events if e.device_type == DeviceType.CUDA]
        cpu_ops: dict[str, float] = {}
        num_ops = 0
        for e in events:
            if e.device_type == DeviceType.CPU:
                cpu_ops[e.name] = cpu_ops.get(e.name, 0.0) + e.self_cpu_time_total
                num_ops += e.name.startswith("aten::")
        out.update({"profiled_steps": len(plans), "profiled_wall_ms": 1e3 * profiled_s / n,
                    "aten_ops_per_step": num_ops / n, "top_host_ops_ms": _top(cpu_ops, n)})
        if cuda:
            kernels: dict[str, float] = {}
            for e in device:
                kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
            busy_ms = _union_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3 / n
            out.update({"kernel_ms": busy_ms, "kernel_over_wall": busy_ms / row["step_ms"],
                        "host_gap_ms": row["step_ms"] - busy_ms,
                        "device_events_per_step": len(device) / n,
                        "top_kernels_ms": _top(kernels, n)})
    except Exception as e:  # noqa: BLE001 - the split above stands without the profiler
        out["profiler_error"] = f"{type(e).__name__}: {e}"
    return out


def _top(totals_us: dict, n: int, k: int = 8) -> list:
    return [[name[:80], round(us / 1e3 / n, 4)]
            for name, us in sorted(totals_us.items(), key=lambda kv: -kv[1])[:k]]


def _union_us(intervals) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total

