"""Offline benchmark targets: this Engine, and Hugging Face baselines on the same weights.

Each target runs the whole workload and reports wall time, useful output
tokens (each request's own max_tokens; static batching's padding tokens do
not count) and, where it has one, how well its KV memory was used.
"""
from __future__ import annotations

import time

import torch

from benchmarks.workload import BenchRequest
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig

NEVER_EOS = -1  # an id no model produces: lengths fixed by max_tokens


def run_engine(model_dir, reqs: list[BenchRequest], config: EngineConfig) -> dict:
    engine = Engine.from_pretrained(model_dir, config)
    _warm_engine(engine)
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r.prompt_token_ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    num_out = 0
    while engine.has_unfinished():
        num_out += sum(len(o.new_token_ids) for o in engine.step())
    wall = time.perf_counter() - t0
    s = engine.stats
    return {
        "wall_s": wall,
        "output_tokens": num_out,
        "peak_kv_usage": s.peak_kv_usage,
        "kv_slot_utilisation_at_peak": s.slot_utilisation_at_peak,
        "num_kv_blocks": engine.kv.pool.num_blocks,
        "preemptions": engine.scheduler.num_preemptions,
        "steps": s.num_steps,
        "step_split_s": {"schedule": s.schedule_s, "forward": s.forward_s, "sample": s.sample_s},
        "config": {"max_num_batched_tokens": config.max_num_batched_tokens,
                   "max_num_seqs": config.max_num_seqs, "block_size": config.block_size},
    }


def _warm_engine(engine: Engine) -> None:
    engine.generate([[0] + list(range(8, 40))], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.stats.__init__()
    engine.scheduler.num_preemptions = 0


def _load_hf(model_dir, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.inference_mode()
def run_hf_static(model_dir, reqs: list[BenchRequest], batch_size: int = 16,
                  dtype=torch.float32) -> dict:
    """`generate` on padded static batches, in arrival order."""
    from transformers import GenerationConfig
    model = _load_hf(model_dir, dtype)
    pad = model.config.pad_token_id or 0
    t0 = time.perf_counter()
    num_out, held, allocated, peak_util = 0, 0, 0, 0.0
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        max_prompt = max(len(r.prompt_token_ids) for r in batch)
        max_new = max(r.max_tokens for r in batch)
        ids = torch.full((len(batch), max_prompt), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):  # left padding
            ids[j, max_prompt - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[j, max_prompt - len(r.prompt_token_ids):] = 1
        gc = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              eos_token_id=NEVER_EOS, pad_token_id=pad)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        assert out.shape[1] == max_prompt + max_new
        num_out += sum(r.max_tokens for r in batch)
        useful = sum(len(r.prompt_token_ids) + r.max_tokens for r in batch)
        slots = len(batch) * (max_prompt + max_new)
        held, allocated = held + useful, allocated + slots
        peak_util = max(peak_util, useful / slots)
    return {"wall_s": time.perf_counter() - t0, "output_tokens": num_out,
            "kv_slot_utilisation": held / allocated, "batch_size": batch_size}


@torch.no_grad()
def run_hf_cb(model_dir, reqs: list[BenchRequest], dtype=torch.float32) -> dict:
    """transformers' own continuous batching (`generate_batch` machinery), per-request lengths."""
    from transformers import GenerationConfig
    model = _load_hf(model_dir, dtype)
    gc = GenerationConfig(max_new_tokens=max(r.max_tokens for r in reqs), do_sample=False,
                          eos_token_id=NEVER_EOS, pad_token_id=model.config.pad_token_id or 0)
    t0 = time.perf_counter()
    num_out = 0
    with model.continuous_batching_context_manager(generation_config=gc, block=True,
                                                   timeout=30) as manager:
        ids = [manager.add_request(r.prompt_token_ids, max_new_tokens=r.max_tokens,
                                   eos_token_id=NEVER_EOS) for r in reqs]
        pending = set(ids)
        deadline = time.monotonic() + 3600
        while pending and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error:
                    raise RuntimeError(f"hf-cb: request failed: {result.error}")
                pending.discard(result.request_id)
                num_out += len(result.generated_tokens)
    if pending:
        raise RuntimeError(f"hf-cb: {len(pending)} requests unfinished")
    return {"wall_s": time.perf_counter() - t0, "output_tokens": num_out}


def run_mesh(mesh_config, model_dir, reqs: list[BenchRequest]) -> dict:
    """The same workload through Envoy as gRPC streams, all requests at once."""
    import asyncio
    import tempfile
    from pathlib import Path

    import grpc

    from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2, \
        scheduler_pb2_grpc
    from mesh.config import resolve_ports
    from mesh.supervisor import Supervisor, build_specs

    cfg = resolve_ports(mesh_config)
    run_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    sup = Supervisor(build_specs(cfg, str(model_dir), run_dir), run_dir)
    sup.start(timeout_s=300)
    try:
        async def one(stub, r):
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=r.prompt_token_ids),
                sampling=common_pb2.SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
            n = 0
            async for chunk in stub.Generate(req, timeout=3600):
                n += len(chunk.token_ids)
            return n

        async def all_requests():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.envoy.port}") as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                await one(stub, BenchRequest([0] + list(range(8, 40)), 4))  # warm-up
                with grpc.insecure_channel(
                        f"127.0.0.1:{cfg.replica_ports[0].scheduler}") as sch:
                    before = scheduler_pb2_grpc.SchedulerStub(sch).GetStats(
                        scheduler_pb2.GetStatsRequest())
                t0 = time.perf_counter()
                counts = await asyncio.gather(*(one(stub, r) for r in reqs))
                wall = time.perf_counter() - t0
                with grpc.insecure_channel(
                        f"127.0.0.1:{cfg.replica_ports[0].scheduler}") as sch:
                    after = scheduler_pb2_grpc.SchedulerStub(sch).GetStats(
                        scheduler_pb2.GetStatsRequest())
                return wall, sum(counts), before, after

        wall, num_out, before, after = asyncio.run(all_requests())
    finally:
        sup.stop()
    steps = after.num_steps - before.num_steps
    split = {k: getattr(after, k) - getattr(before, k)
             for k in ("schedule_s", "kv_rpc_s", "executor_rpc_s", "forward_s", "sample_s")}
    # executor RPC time not spent in forward or sampling: conversion + transport
    split["transport_s"] = split["executor_rpc_s"] - split["forward_s"] - split["sample_s"]
    return {"wall_s": wall, "output_tokens": num_out, "steps": steps,
            "step_split_s": split, "per_step_ms": {k: 1000 * v / max(steps, 1)
                                                   for k, v in split.items()}}
