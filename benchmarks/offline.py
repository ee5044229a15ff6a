"""`llmesh bench offline`: every request at once, every target in the same run.

A thin case of the serving benchmark (harness.py) with offline arrivals; kept as
a function for scripts that call it directly.
"""
from __future__ import annotations

from llmesh.benchmarks.arrivals import ArrivalSpec
from llmesh.benchmarks.harness import BENCH_ENGINE_CONFIG, BenchSetup, RunSpec, context_limit, run_bench
from llmesh.benchmarks.machine import machine_info, versions  # noqa: F401 (used by benchmarks/tp.py)
from llmesh.benchmarks.workload import chat
from llmesh.services.engine.engine import EngineConfig
from llmesh.services.executor.model_config import load_model_config


def run_offline(model_dir, num_requests: int, target_names: list[str], seed: int = 0,
                max_prompt: int = 1024, max_output: int = 512,
                engine_config: EngineConfig = BENCH_ENGINE_CONFIG, mesh_config=None,
                json_out: str | None = None, **setup_kw) -> dict:
    """The `chat` workload's first `num_requests` requests, all sent at t = 0."""
    mc = load_model_config(model_dir)
    limit = context_limit(mc, engine_config, mesh_config if "mesh" in target_names else None)
    setup = BenchSetup(model_dir=str(model_dir),
                       workload=chat(mc.vocab_size, limit, seed, max_prompt, max_output,
                                     mc.bos_token_id or 0),
                       target_names=list(target_names),
                       runs=[RunSpec(ArrivalSpec("offline"), num_requests=num_requests)],
                       engine_config=engine_config, mesh_config=mesh_config, seed=seed,
                       max_output=max_output, **setup_kw)
    return run_bench(setup, json_out=json_out).report
