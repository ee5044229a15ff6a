"""python -m services.executor --port P --model DIR [--num-kv-blocks N | --kv-cache-bytes B]"""
from __future__ import annotations

import argparse
import asyncio

import torch

from llmesh.v1 import executor_pb2_grpc
from services.common.server import Service, setup_logging
from services.executor.runner import ModelRunner
from services.executor.servicer import ExecutorServicer
from services.executor.weights import load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="services.executor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-kv-blocks", type=int, required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    return p.parse_args(argv)


async def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    service = Service("executor", args.port)
    servicer = ExecutorServicer(None)
    service.add(executor_pb2_grpc.add_ExecutorServicer_to_server, servicer, "llmesh.v1.Executor")
    await service.start()  # health answers NOT_SERVING while the model loads
    model = await asyncio.to_thread(load_model, args.model, args.dtype, args.device)
    servicer.runner = ModelRunner(model, args.num_kv_blocks, args.block_size, args.device)
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    setup_logging("executor")
    asyncio.run(main(parse_args()))
