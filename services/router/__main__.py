"""python -m services.router --port P --tokenizer ADDR --schedulers ADDR[,ADDR...]"""
from __future__ import annotations

import argparse
import asyncio
import json

import grpc

from llmesh.v1 import inference_pb2
from observability import telemetry
from services.common.server import Service
from services.router.admission import Admission
from services.router.deadletters import dead_letters_from
from services.router.dispatch import Dispatcher
from services.router.servicer import Inference


async def main(args) -> None:
    service = Service("router", args.port, max_message_bytes=args.max_message_bytes,
                      traced=True)
    channel = grpc.aio.insecure_channel(args.tokenizer, interceptors=telemetry.client_interceptors())
    dispatcher = Dispatcher(args.schedulers.split(","), max_migrations=args.max_migrations,
                            replica_wait_s=args.replica_wait_s)
    admission = json.loads(args.admission)
    inference = Inference(channel, dispatcher, args.model_name, Admission.from_dict(admission),
                          dead_letters_from(admission))
    service.add_public(inference, inference_pb2.DESCRIPTOR.services_by_name["Inference"])
    service.enable_reflection()
    await service.start()
    dispatcher.start()
    watcher = asyncio.ensure_future(_track_health(service, inference))
    await service.wait_for_termination()
    watcher.cancel()


async def _track_health(service: Service, inference: Inference) -> None:
    """SERVING while at least one replica is connected."""
    serving = None
    while True:
        if inference.dispatcher.is_ready != serving:
            serving = inference.dispatcher.is_ready
            await service.set_serving(serving)
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="services.router")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--schedulers", required=True)
    p.add_argument("--model-name", default="default")
    p.add_argument("--max-message-bytes", type=int, default=4 * 2**20)
    p.add_argument("--admission", default="{}", help="mesh.yaml's admission section as JSON")
    p.add_argument("--max-migrations", type=int, default=3,
                   help="times a request may move to another replica when its own is lost")
    p.add_argument("--replica-wait-s", type=float, default=30.0,
                   help="how long a request waits for a ready replica while they recover")
    args = p.parse_args()
    telemetry.init("router")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
