"""`llmesh bench offline`: one seeded workload on every target, side by side in one run."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import targets
from benchmarks.workload import offline_workload
from services.engine.engine import EngineConfig
from services.executor.model_config import load_model_config

BENCH_ENGINE_CONFIG = EngineConfig(kv_cache_bytes=1 << 30, max_num_batched_tokens=1024,
                                   max_num_seqs=64)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": mem, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    import tokenizers
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "tokenizers": tokenizers.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        out["llmesh_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True,
                                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        pass
    return out


def run_offline(model_dir, num_requests: int, target_names: list[str], seed: int = 0,
                max_prompt: int = 1024, max_output: int = 512,
                engine_config: EngineConfig = BENCH_ENGINE_CONFIG, log=print,
                mesh_config=None, json_out: str | None = None) -> dict:
    config = load_model_config(model_dir)
    reqs = offline_workload(num_requests, config.vocab_size, seed, max_prompt, max_output,
                            config.bos_token_id or 0)
    runners = {
        "engine": lambda: targets.run_engine(model_dir, reqs, engine_config),
        "hf-static": lambda: targets.run_hf_static(model_dir, reqs),
        "hf-cb": lambda: targets.run_hf_cb(model_dir, reqs),
        "mesh": lambda: targets.run_mesh(mesh_config or mesh_config_for(engine_config, config),
                                         model_dir, reqs),
    }
    unknown = [t for t in target_names if t not in runners]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {', '.join(runners)}")
    results = {}
    report = {}
    for name in target_names:
        log(f"[bench] {name}: {len(reqs)} requests ...")
        res = runners[name]()
        res["output_tokens_per_s"] = res["output_tokens"] / res["wall_s"]
        log(f"[bench] {name}: {res['output_tokens_per_s']:.1f} output tok/s ({res['wall_s']:.1f} s)")
        results[name] = res
        base = results.get("engine")
        if base:
            for res in results.values():
                res["engine_speedup"] = base["output_tokens_per_s"] / res["output_tokens_per_s"]
        report = _report(reqs, seed, max_prompt, max_output, model_dir, config, results)
        if json_out:  # after every target, so a long run keeps what it measured
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def mesh_config_for(engine_config: EngineConfig, model_config):
    """A one-replica mesh with the same engine limits as the in-process target."""
    from mesh.config import EngineLimits, MeshConfig
    from services.executor.model_config import DTYPES
    from services.executor.runner import ModelRunner
    e = engine_config
    per_block = ModelRunner.kv_bytes_per_block(model_config, e.block_size, DTYPES[e.dtype])
    return MeshConfig(engine=EngineLimits(
        block_size=e.block_size, num_kv_blocks=e.num_kv_blocks or e.kv_cache_bytes // per_block,
        max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs,
        enable_prefix_caching=e.enable_prefix_caching, dtype=e.dtype),
        envoy=_free_envoy())


def _free_envoy():
    from mesh.config import EnvoyConfig
    return EnvoyConfig(port=0, admin_port=0)


def _report(reqs, seed, max_prompt, max_output, model_dir, config, results) -> dict:
    return {
        "workload": {"num_requests": len(reqs), "seed": seed,
                     "prompt_tokens": sum(len(r.prompt_token_ids) for r in reqs),
                     "output_tokens": sum(r.max_tokens for r in reqs),
                     "max_prompt": max_prompt, "max_output": max_output},
        "model": {"dir": str(model_dir), "architecture": config.architecture,
                  "num_params": _num_params(model_dir)},
        "targets": results,
        "machine": machine_info(),
        "versions": versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _num_params(model_dir) -> int:
    from safetensors import safe_open
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                total += _prod(f.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_offline_cli(args) -> int:
    from mesh.default_model import default_model_dir
    model_dir = args.model or default_model_dir("bench")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    mesh_config = None
    if args.config:
        from mesh.config import load_config
        mesh_config = load_config(args.config)
        if mesh_config.model and not args.model:
            model_dir = mesh_config.model
    report = run_offline(model_dir, args.num_requests, names, args.seed, args.max_prompt,
                         args.max_output, log=lambda m: print(m, file=sys.stderr),
                         mesh_config=mesh_config, json_out=args.json_out)
    print(json.dumps(report, indent=2))
    return 0
