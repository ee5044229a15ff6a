"""The serving benchmark: one workload, one or more runs (arrival process and load),
every target side by side in the same invocation, one report.

`run_bench(setup)` starts each target in turn, plays every run against it
(requests sent at their arrival times by one asyncio loop, tokens timestamped
as received), collects the KV and step figures the target exposes, and returns
the report (JSON-ready) plus the raw per-request records.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmesh.benchmarks import machine
from llmesh.benchmarks.arrivals import ArrivalSpec, schedule
from llmesh.benchmarks.kit import stamp, write_json
from llmesh.benchmarks.metrics import RequestRecord, request_rows, summarize
from llmesh.benchmarks.progress import Progress
from llmesh.benchmarks.workload import Workload
from llmesh.services.engine.engine import EngineConfig
from llmesh.services.executor.model_config import load_model_config

TARGETS = ("engine", "mesh", "openai", "hf-static", "hf-cb")
BENCH_ENGINE_CONFIG = EngineConfig(kv_cache_bytes=1 << 30, max_num_batched_tokens=1024,
                                   max_num_seqs=64)
MAX_KV_SAMPLES = 1000


@dataclass(frozen=True)
class RunSpec:
    """One point of a run: how requests arrive, and how many or for how long."""

    arrivals: ArrivalSpec
    num_requests: int | None = None
    duration_s: float | None = None

    def to_dict(self) -> dict:
        return {"arrivals": self.arrivals.to_dict(), "label": self.arrivals.label,
                "num_requests": self.num_requests, "duration_s": self.duration_s}


@dataclass
class BenchSetup:
    model_dir: str
    workload: Workload
    target_names: list[str]
    runs: list[RunSpec]
    engine_config: EngineConfig = BENCH_ENGINE_CONFIG
    mesh_config: object = None  # MeshConfig; None = one replica with the engine's limits
    mesh_endpoint: str | None = None  # attach to a running mesh instead of starting one
    mesh_schedulers: list[str] = field(default_factory=list)
    openai_url: str | None = None  # the openai target: a server's /v1 URL (None: the mesh's)
    openai_model: str = ""
    openai_api_key: str = ""
    slo: dict = field(default_factory=dict)
    baseline: str | None = None  # None: engine if present, else the first target
    seed: int = 0
    sample_interval_s: float = 0.1
    drain_timeout_s: float = 3600.0  # after the last arrival, before stragglers are cancelled
    hf_batch_size: int = 16
    max_output: int = 512
    bandwidth_bytes: int = 256 * 2**20
    show_progress: bool = True
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))
    command: str = ""  # the command line that ran it, recorded in the report


@dataclass
class BenchResult:
    report: dict
    records: dict[str, list[list[RequestRecord]]]  # per target, per run


def run_bench(setup: BenchSetup, json_out: str | Path | None = None) -> BenchResult:
    unknown = [t for t in setup.target_names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    model_config = load_model_config(setup.model_dir)
    if {"mesh", "openai"} & set(setup.target_names) and setup.mesh_config is None \
            and not setup.mesh_endpoint:
        setup = dataclasses.replace(setup, mesh_config=mesh_config_for(setup.engine_config,
                                                                       model_config))
    offsets = [None if r.arrivals.kind == "concurrency" else
               schedule(r.arrivals, r.num_requests, r.duration_s, f"{setup.seed}/{i}",
                        setup.workload.burst) for i, r in enumerate(setup.runs)]
    setup.log(f"[bench] measuring memory bandwidth ({setup.bandwidth_bytes >> 20} MiB copies) ...")
    context = {
        "model": _model_info(setup, model_config),
        "memory_bandwidth": machine.measure_memory_bandwidth(setup.bandwidth_bytes,
                                                             device=setup.engine_config.device),
        **stamp(setup.command),
    }
    results: dict[str, list[dict]] = {}
    records: dict[str, list[list[RequestRecord]]] = {}
    failures: dict[str, str] = {}
    for name in setup.target_names:
        target = make_target(name, setup, model_config)
        setup.log(f"[bench] {name}: starting ...")
        try:
            t0 = time.perf_counter()
            target.start()
            start_s = time.perf_counter() - t0
            runs = asyncio.run(_session(target, name, setup, offsets))
        except Exception as e:  # noqa: BLE001 - one target failing must not lose the others
            failures[name] = f"{type(e).__name__}: {e}"
            setup.log(f"[bench] {name}: FAILED: {failures[name]}")
            runs = None
        finally:
            target.stop()
        if runs is None:
            if json_out:
                write_json(_report(setup, context, results, failures), json_out)
            continue
        results[name] = []
        records[name] = []
        for spec, (recs, run_t0, stats) in zip(setup.runs, runs):
            figures = _figures(recs, run_t0, stats, setup, context["model"],
                               context["memory_bandwidth"]["bytes_per_s"])
            figures["startup_s"] = start_s
            results[name].append(figures)
            records[name].append(recs)
            setup.log(f"[bench] {name} {spec.arrivals.label}: {figures['num_ok']}/"
                      f"{figures['num_requests']} ok, {figures['output_tokens_per_s']:.1f} output "
                      f"tok/s, TTFT p50 {figures['ttft_ms'].get('p50', float('nan')):.1f} ms")
        if json_out:  # after every target, so a long run keeps what it measured
            write_json(_report(setup, context, results, failures), json_out)
    return BenchResult(_report(setup, context, results, failures), records)


def make_target(name: str, setup: BenchSetup, model_config):
    if name == "engine":
        from llmesh.benchmarks.targets import EngineTarget
        return EngineTarget(setup.model_dir, setup.engine_config, setup.sample_interval_s)
    if name == "mesh":
        from llmesh.benchmarks.targets import MeshTarget
        cfg = setup.mesh_config or mesh_config_for(setup.engine_config, model_config)
        return MeshTarget(cfg, setup.model_dir, setup.mesh_endpoint, setup.mesh_schedulers,
                          setup.sample_interval_s)
    if name == "openai":
        from llmesh.benchmarks.openai_target import OpenAITarget
        cfg = setup.mesh_config or mesh_config_for(setup.engine_config, model_config)
        url = setup.openai_url or (f"http://{setup.mesh_endpoint}/v1" if setup.mesh_endpoint
                                   else None)
        return OpenAITarget(cfg, setup.model_dir, url, setup.openai_model, setup.openai_api_key,
                            scheduler_addrs=None if setup.openai_url else setup.mesh_schedulers,
                            sample_interval_s=setup.sample_interval_s)
    from llmesh.services.executor.weights import resolve_dtype
    dtype = resolve_dtype(model_config, setup.engine_config.dtype)
    if name == "hf-static":
        from llmesh.benchmarks.hf_targets import HFStaticTarget
        return HFStaticTarget(setup.model_dir, setup.hf_batch_size, dtype)
    from llmesh.benchmarks.hf_targets import HFCBTarget
    e = setup.engine_config
    return HFCBTarget(setup.model_dir, setup.max_output, dtype,
                      kv_tokens=kv_blocks(e, model_config) * e.block_size,
                      max_batch_tokens=e.max_num_batched_tokens,
                      max_requests_per_batch=e.max_num_seqs)


def kv_blocks(engine_config: EngineConfig, model_config) -> int:
    """The configured KV blocks (0: sized from memory when the engine starts)."""
    from llmesh.services.executor.runner import ModelRunner
    from llmesh.services.executor.weights import resolve_dtype
    e = engine_config
    if e.num_kv_blocks or not e.kv_cache_bytes:
        return e.num_kv_blocks or 0
    per_block = ModelRunner.kv_bytes_per_block(model_config, e.block_size,
                                               resolve_dtype(model_config, e.dtype))
    return e.kv_cache_bytes // per_block


# the limits an in-process Engine and a mesh replica share, by the same names
SHARED_LIMITS = ("block_size", "max_num_batched_tokens", "max_num_seqs", "enable_prefix_caching",
                 "dtype", "device")


def mesh_config_for(engine_config: EngineConfig, model_config):
    """A one-replica mesh with the same engine limits as the in-process target, on free ports."""
    from llmesh.mesh.config import EngineLimits, EnvoyConfig, MeshConfig
    e = engine_config
    return MeshConfig(engine=EngineLimits(
        num_kv_blocks=kv_blocks(e, model_config), max_model_len=e.max_model_len or 0,
        **{k: getattr(e, k) for k in SHARED_LIMITS}), envoy=EnvoyConfig(port=0, admin_port=0))


def engine_config_for(mesh_config) -> EngineConfig:
    """The in-process engine with a mesh replica's limits (so the two compare like for like)."""
    m = mesh_config.engine
    return EngineConfig(num_kv_blocks=m.num_kv_blocks, max_model_len=m.max_model_len or None,
                        **{k: getattr(m, k) for k in SHARED_LIMITS})


def context_limit(model_config, engine_config: EngineConfig, mesh_config=None) -> int:
    """Tokens a request may hold (prompt + output) on every target: the model's context,
    the configured max_model_len and the KV capacity."""
    e = engine_config
    limit = min(model_config.max_position_embeddings, e.max_model_len or 1 << 30)
    limit = min(limit, kv_blocks(e, model_config) * e.block_size or 1 << 30)
    if mesh_config is not None:
        m = mesh_config.engine
        limit = min(limit, m.max_model_len or 1 << 30, m.num_kv_blocks * m.block_size or 1 << 30)
    return limit


# ---- one target, every run --------------------------------------------------
async def _session(target, name: str, setup: BenchSetup, offsets: list) -> list[tuple]:
    out = []
    try:
        await target.open()
        for i, (spec, offs) in enumerate(zip(setup.runs, offsets)):
            await target.begin_run()
            recs, t0 = await _drive(target, name, spec, offs, setup.workload.stream(i), setup)
            out.append((recs, t0, await target.end_run()))
    finally:
        await target.close()
    return out


async def _drive(target, name: str, spec: RunSpec, offsets: list[float] | None, requests,
                 setup: BenchSetup) -> tuple[list[RequestRecord], float]:
    """Send the run's requests at their arrival times (or at a fixed concurrency) and wait
    for them, at most drain_timeout_s after the last one was sent."""
    records: list[RequestRecord] = []
    total = len(offsets) if offsets is not None else spec.num_requests
    progress = Progress(f"{name} {spec.arrivals.label}", total, spec.duration_s,
                        enabled=setup.show_progress)

    async def one(rec: RequestRecord, req) -> None:
        try:
            await target.request(req, rec)
        except asyncio.CancelledError:
            if rec.status == "PENDING":
                rec.status = "TIMEOUT"
            raise
        except Exception as e:  # noqa: BLE001 - counted as the request's status
            rec.status, rec.error, rec.done_s = "CLIENT_ERROR", repr(e), time.perf_counter()
        progress.update(1, rec.num_output_tokens)

    def record(i: int, req, arrival_s: float) -> RequestRecord:
        rec = RequestRecord(i, len(req.prompt_token_ids), req.max_tokens, arrival_s)
        records.append(rec)
        return rec

    t0 = time.perf_counter() + 0.002
    tasks: list[asyncio.Task] = []
    if offsets is None:  # fixed concurrency
        deadline = t0 + spec.duration_s if spec.duration_s else math.inf
        counter = itertools.count()

        async def worker() -> None:
            while True:
                i = next(counter)
                if (spec.num_requests is not None and i >= spec.num_requests) \
                        or time.perf_counter() >= deadline:
                    return
                req = next(requests)
                await one(record(i, req, time.perf_counter()), req)

        tasks = [asyncio.create_task(worker()) for _ in range(spec.arrivals.concurrency)]
        timeout = (spec.duration_s or 0) + setup.drain_timeout_s
    else:
        for i, (off, req) in enumerate(zip(offsets, requests)):
            if spec.arrivals.kind == "offline" and not req.priority:
                # all sent at once is an offline job: the batch class, whose TTFT budget
                # (10 min) SLO admission holds it to, not an interactive one's
                req = dataclasses.replace(req, priority="batch")
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(record(i, req, t0 + off), req)))
        timeout = setup.drain_timeout_s
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.status == "PENDING":
            rec.status = "TIMEOUT"
    progress.close()
    return records, t0


# ---- figures and the report -------------------------------------------------
def _figures(recs, t0: float, stats: dict, setup: BenchSetup, model: dict,
             bandwidth: float) -> dict:
    figures = summarize(recs, t0, setup.slo)
    figures["wall_s"] = figures["duration_s"]
    stats = dict(stats)
    kv = dict(stats.pop("kv", {}))
    if "samples" in kv:
        samples = [[round(s[0] - t0, 4)] + s[1:5] for s in kv["samples"]]
        every = max(1, math.ceil(len(samples) / MAX_KV_SAMPLES))
        kv["samples"] = samples[::every]
        kv["sample_columns"] = ["t_s", "usage", "waste", "num_running", "num_waiting"]
    figures["kv"] = kv
    figures.update(stats)
    kv_tokens = stats.get("kv_read_tokens_per_step")
    figures["roofline"] = machine.roofline(
        model["decode_bytes"], None if kv_tokens is None else kv_tokens * model["kv_bytes_per_token"],
        bandwidth, stats.get("mean_step_s"))
    figures["requests"] = request_rows(recs, t0)
    figures["requests_columns"] = ["arrival_s", "ttft_ms", "e2e_ms", "prompt_tokens",
                                   "output_tokens", "status"]
    return figures


def _model_info(setup: BenchSetup, model_config) -> dict:
    dtype = setup.engine_config.dtype
    return {"dir": str(setup.model_dir), "architecture": model_config.architecture,
            **machine.model_bytes(setup.model_dir, dtype),
            "kv_bytes_per_token": machine.kv_bytes_per_token(model_config, dtype),
            "max_position_embeddings": model_config.max_position_embeddings}


def pick_baseline(names: list[str], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    return "engine" if "engine" in names else (names[0] if names else None)


def _ratios(runs: list[dict], baseline: str | None) -> None:
    """Each target's figures over the baseline's, per run."""
    for run in runs:
        base = run["targets"].get(baseline)
        for figures in run["targets"].values():
            if base is None:
                continue
            ratio = {}
            for key, value, ref in (
                    ("output_tokens_per_s", figures["output_tokens_per_s"], base["output_tokens_per_s"]),
                    ("request_throughput", figures["request_throughput"], base["request_throughput"]),
                    ("ttft_p99", figures["ttft_ms"].get("p99"), base["ttft_ms"].get("p99")),
                    ("goodput", figures.get("goodput", {}).get("requests_per_s"),
                     base.get("goodput", {}).get("requests_per_s"))):
                if value is not None and ref:
                    ratio[key] = value / ref
            figures["vs_baseline"] = ratio
            if run["arrivals"]["kind"] == "offline" and "engine" in run["targets"]:
                figures["engine_speedup"] = (run["targets"]["engine"]["output_tokens_per_s"]
                                             / max(figures["output_tokens_per_s"], 1e-12))


def _report(setup: BenchSetup, context: dict, results: dict, failures: dict) -> dict:
    runs = []
    for i, spec in enumerate(setup.runs):
        runs.append({**spec.to_dict(), "targets": {name: res[i] for name, res in results.items()}})
    baseline = pick_baseline(list(results), setup.baseline)
    _ratios(runs, baseline)
    mesh_cfg = setup.mesh_config.to_dict() if setup.mesh_config is not None else None
    return {
        "kind": "llmesh-bench",
        "workload": setup.workload.meta,
        "runs": runs,
        "slo": dict(setup.slo),
        "baseline": baseline,
        "failed_targets": failures,
        **context,
        "config": {"targets": list(setup.target_names),
                   "engine": dataclasses.asdict(setup.engine_config), "mesh": mesh_cfg,
                   "mesh_endpoint": setup.mesh_endpoint, "seed": setup.seed,
                   "sample_interval_s": setup.sample_interval_s,
                   "drain_timeout_s": setup.drain_timeout_s, "hf_batch_size": setup.hf_batch_size},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
