"""python -m llmesh.services.kvcache --port P"""
from __future__ import annotations

import argparse
import asyncio

from llmesh.v1 import kvcache_pb2_grpc
from llmesh.observability import telemetry
from llmesh.observability.metrics import register_kvcache
from llmesh.services.common.server import Service
from llmesh.services.kvcache.index import PrefixIndex
from llmesh.services.kvcache.servicer import KVCacheServicer


async def main(args) -> None:
    # (snapshots are large; Match is a traced hop of a request, Publish a stream
    # for the scheduler's life)
    service = Service("kvcache", args.port, max_message_bytes=64 * 2**20, traced=True,
                      untraced_methods=("Publish",))
    index = PrefixIndex()
    register_kvcache(index)
    service.add(kvcache_pb2_grpc.add_KVCacheServicer_to_server, KVCacheServicer(index),
                "llmesh.v1.KVCache")
    await service.start()
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="llmesh.services.kvcache")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    telemetry.init("kvcache")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
