"""python -m services.kvcache --port P --num-blocks N --block-size B"""
from __future__ import annotations

import argparse
import asyncio

from llmesh.v1 import kvcache_pb2_grpc
from observability import telemetry
from services.common.server import Service
from services.scheduler.kv_manager import KVCacheManager
from services.kvcache.servicer import KVCacheServicer


async def main(args) -> None:
    service = Service("kvcache", args.port)
    kv = KVCacheManager(args.num_blocks, args.block_size, not args.no_prefix_caching,
                        record_events=True)
    from observability.metrics import register_kvcache
    register_kvcache(kv)
    service.add(kvcache_pb2_grpc.add_KVCacheServicer_to_server, KVCacheServicer(kv),
                "llmesh.v1.KVCache")
    await service.start()
    await service.set_serving(True)
    await service.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="services.kvcache")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-blocks", type=int, required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    args = p.parse_args()
    telemetry.init("kvcache")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
