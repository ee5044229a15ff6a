"""python -m llmesh.services.executor --port P --model DIR --num-kv-blocks N
    [--rank R --world-size W --dist-addr HOST:PORT]   (tensor parallel)"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import torch

from llmesh.v1 import executor_pb2_grpc
from llmesh.observability import telemetry
from llmesh.services.common.server import Service
from llmesh.services.executor.kv_memory import DEFAULT_KV_MEMORY_SHARE, kv_cap_blocks, size_kv_cache
from llmesh.services.executor.runner import ModelRunner
from llmesh.services.executor.servicer import ExecutorServicer
from llmesh.services.executor.weights import load_model
from llmesh.services.common.gguf_file import model_arg


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llmesh.services.executor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, type=model_arg)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-cpu-decode-kernel", action="store_true",
                   help="a bfloat16 or float32 model's small decode steps on a CPU run the "
                        "eager forward, not the one-call kernel "
                        "(services/executor/cpu_decode_step.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-kv-blocks", type=int, required=True,
                   help="KV blocks; 0 = a share of the memory available after loading")
    p.add_argument("--kv-memory-share", type=float, default=DEFAULT_KV_MEMORY_SHARE,
                   help="with --num-kv-blocks 0: this process's share of the available memory")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="with --num-kv-blocks 0: at most these many sequences' blocks ...")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="... of this many tokens (0 = the model's context)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly (default: decode steps of up to "
                        "--max-num-seqs sequences replay CUDA graphs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1, help="tensor-parallel ranks of the replica")
    p.add_argument("--dist-addr", default="", help="rank 0's rendezvous HOST:PORT (world size > 1)")
    p.add_argument("--dist-timeout-s", type=float, default=60.0)
    p.add_argument("--test-corrupt-after-steps", type=int, default=0,
                   help="tests only: after this many sampling steps, sampled tokens are wrong")
    p.add_argument("--test-leak-mb-per-step", type=float, default=0.0,
                   help="tests only: after a SIGUSR1, each step keeps this much memory "
                        "(the leak watchdog's test)")
    p.add_argument("--bench-step-ms", type=float, default=0.0,
                   help="benchmark only: a model whose forward sleeps this long, instead of "
                        "the checkpoint's (measures what the mesh adds per step)")
    return p.parse_args(argv)


def _exit_group(exc: BaseException) -> None:
    logging.getLogger("llmesh.executor").error(
        "tensor-parallel step failed on this rank (%r); exiting so the group restarts", exc)
    os._exit(3)


async def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    service = Service("executor", args.port)
    device = args.device
    if device == "cuda" and args.world_size > 1:
        device = f"cuda:{args.rank % torch.cuda.device_count()}"
    tp = args.world_size > 1 and not args.bench_step_ms
    runner: asyncio.Future = asyncio.get_running_loop().create_future()  # (once loaded)
    servicer = ExecutorServicer(runner, on_fatal=_exit_group if tp else None, rank=args.rank,
                                on_exit=service.stop,
                                test_leak_mb_per_step=args.test_leak_mb_per_step)
    service.add(executor_pb2_grpc.add_ExecutorServicer_to_server, servicer, "llmesh.v1.Executor")
    if args.test_leak_mb_per_step:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, servicer.start_test_leak)
    await service.start()  # health answers NOT_SERVING while the group forms and the model loads
    group = None
    if tp:
        from llmesh.services.executor.parallel import init_group
        group = await asyncio.to_thread(init_group, args.rank, args.world_size, args.dist_addr,
                                        device, args.dist_timeout_s)
    if args.bench_step_ms:
        from llmesh.services.executor.model_config import load_model_config
        from llmesh.services.executor.sleep_model import SleepModel
        model = SleepModel(load_model_config(args.model), args.bench_step_ms / 1000)
    else:
        model = await asyncio.to_thread(load_model, args.model, args.dtype, device, group,
                                        not args.no_cpu_decode_kernel)
    num_blocks = args.num_kv_blocks
    if not num_blocks:
        if torch.device(device).type != "cpu":
            raise SystemExit("num_kv_blocks: 0 (sized from memory) is for CPU executors; "
                             "set num_kv_blocks for CUDA")
        per_block = ModelRunner.kv_bytes_per_block(
            model.config, args.block_size, model.model.embed_tokens.weight.dtype,
            num_kv_heads=model.model.layers[0].self_attn.num_kv_heads)
        mc = model.config
        model_len = min(args.max_model_len or mc.max_position_embeddings,
                        mc.max_position_embeddings)
        cap = kv_cap_blocks(args.max_num_seqs, model_len, args.block_size)
        num_blocks = size_kv_cache(per_block, cap, args.kv_memory_share).num_blocks
    runner.set_result(ModelRunner(
        model, num_blocks, args.block_size, device,
        test_corrupt_after_steps=args.test_corrupt_after_steps, tokenizer_dir=args.model,
        cuda_graph_batch=0 if args.enforce_eager else args.max_num_seqs,
        max_model_len=args.max_model_len or None))
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    args = parse_args()
    telemetry.init("executor" if args.world_size == 1 else f"executor-rank{args.rank}")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
