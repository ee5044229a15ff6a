"""python -m llmesh.services.tokenizer --port P --model DIR"""
from __future__ import annotations

import argparse
import asyncio

from llmesh.v1 import tokenizer_pb2_grpc
from llmesh.observability import telemetry
from llmesh.services.common.server import Service
from llmesh.services.tokenizer.servicer import TokenizerServicer
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.common.gguf_file import model_arg


async def main(args) -> None:
    service = Service("tokenizer", args.port, traced=True)
    service.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
                TokenizerServicer(TextTokenizer(args.model)), "llmesh.v1.Tokenizer")
    await service.start()
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="llmesh.services.tokenizer")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, type=model_arg)
    args = p.parse_args()
    telemetry.init("tokenizer")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
