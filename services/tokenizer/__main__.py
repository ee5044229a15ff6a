"""python -m services.tokenizer --port P --model DIR"""
from __future__ import annotations

import argparse
import asyncio

from llmesh.v1 import tokenizer_pb2_grpc
from observability import telemetry
from services.common.server import Service
from services.tokenizer.servicer import TokenizerServicer
from services.common.tokenizer import TextTokenizer


async def main(args) -> None:
    service = Service("tokenizer", args.port, traced=True)
    service.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
                TokenizerServicer(TextTokenizer(args.model)), "llmesh.v1.Tokenizer")
    await service.start()
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="services.tokenizer")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    args = p.parse_args()
    telemetry.init("tokenizer")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
