"""python -m services.openai_api --port P --routers HOST:PORT[,...] --model DIR --model-name NAME

Serves the OpenAI-compatible HTTP API on 127.0.0.1:P (uvicorn, httptools),
calling the routers round-robin over one gRPC channel.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from functools import lru_cache

import grpc
import uvicorn

from observability import telemetry
from services.common.tokenizer import TextTokenizer
from services.openai_api.app import OpenAIApi


def router_channel(addresses: str, max_message_bytes: int) -> grpc.aio.Channel:
    """One channel over every router, round-robin, waiting out restarts."""
    target = "ipv4:" + addresses
    service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    return grpc.aio.insecure_channel(target, interceptors=telemetry.client_interceptors(), options=[
        ("grpc.service_config", service_config),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)])


async def main(args) -> None:
    tokenizer = TextTokenizer(args.model)

    @lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    channel = router_channel(args.routers, args.max_message_bytes)
    api = OpenAIApi(channel, args.model_name, token_text, heartbeat_s=args.heartbeat_s)
    config = uvicorn.Config(api.app, host="127.0.0.1", port=args.port, http="httptools",
                            loop="asyncio", lifespan="off", log_level="warning",
                            access_log=False, timeout_keep_alive=75,
                            timeout_graceful_shutdown=30)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await channel.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="services.openai_api")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--routers", required=True, help="host:port[,host:port...]")
    p.add_argument("--model", required=True, help="the model directory (its tokenizer)")
    p.add_argument("--model-name", default="default")
    p.add_argument("--heartbeat-s", type=float, default=15.0)
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    args = p.parse_args()
    telemetry.init("openai-api")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
