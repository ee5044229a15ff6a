"""python -m llmesh.services.router --port P --tokenizer ADDR (--schedulers ADDR[,ADDR...] | --replica-set FILE)
[--http-port H --model DIR] [--models JSON]

--models: more models behind this router, each
{"name", "tokenizer": ADDR, "replica_set": FILE, "model": DIR} (services/router/models.py)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import uvicorn

from llmesh.v1 import inference_pb2
from llmesh.observability import telemetry
from llmesh.services.common.server import Service, bind_host
from llmesh.services.common.errors import UnavailableError
from llmesh.services.common.mtls import MtlsFiles, server_credentials, uvicorn_ssl
from llmesh.services.router.admission import Admission
from llmesh.services.router.clients import PrefixIndex, TokenizerClient
from llmesh.services.router.deadletters import dead_letters_from
from llmesh.services.router.core import POLICIES, ReplicaChooser, RoutingPolicy
from llmesh.services.router.dispatch import Dispatcher
from llmesh.services.router.replica_set import read_replica_set, watch_replica_set
from llmesh.services.router.generation import Call, Generation
from llmesh.services.router.models import Models
from llmesh.services.router.servicer import Inference
from llmesh.services.common.gguf_file import model_arg


async def main(args) -> None:
    mtls = MtlsFiles(args.mtls_dir) if args.mtls_dir else None
    service = Service("router", args.port, max_message_bytes=args.max_message_bytes,
                      traced=True, credentials=server_credentials(mtls) if mtls else None)
    prefix_index = PrefixIndex(grpc.aio.insecure_channel(
        args.kvcache, interceptors=telemetry.client_interceptors())) if args.kvcache else None
    admission = json.loads(args.admission)
    shared = (Admission.from_dict(admission), dead_letters_from(admission))
    main_model = {"name": args.model_name, "tokenizer": args.tokenizer, "model": args.model,
                  "replica_set": str(args.replica_set or ""),
                  "schedulers": args.schedulers.split(",") if args.schedulers else [],
                  "standby": args.standby}
    specs = [main_model] + json.loads(args.models)
    cores = [_core(args, spec, prefix_index, shared, failing=args.test_fail_requests)
             for spec in specs]
    models = Models([generation for generation, _ in cores])
    inference = Inference(models)
    service.add_public(inference, inference_pb2.DESCRIPTOR.services_by_name["Inference"])
    service.enable_reflection()
    http = _http_server(args, models, {spec["name"]: spec["model"] for spec in specs}, mtls) \
        if args.http_port else None
    await service.start()
    watchers = [asyncio.ensure_future(_track_health(service, models))]
    for generation, replica_set in cores:
        generation.dispatcher.start()
        if replica_set:
            watchers.append(asyncio.ensure_future(
                watch_replica_set(replica_set, generation.dispatcher.set_replicas)))
    serving_http = asyncio.ensure_future(http.serve()) if http else None
    await service.wait_for_termination()
    for watcher in watchers:
        watcher.cancel()
    if http is not None:
        http.should_exit = True
        await asyncio.wait_for(serving_http, 10)


def _core(args, spec: dict, prefix_index, shared, failing: bool) -> tuple[Generation, str]:
    """One model's request core (its tokenizer and replicas), and its replica set file."""
    tokenizer = TokenizerClient(grpc.aio.insecure_channel(
        spec["tokenizer"], interceptors=telemetry.client_interceptors()))
    chooser = ReplicaChooser(RoutingPolicy(args.routing_policy, args.prefix_load_bound,
                                           args.prefix_load_ratio))
    dispatcher = Dispatcher(spec.get("schedulers", []), max_migrations=args.max_migrations,
                            replica_wait_s=args.replica_wait_s, num_standby=spec.get("standby", 0),
                            replica_silence_s=args.replica_silence_s,
                            chooser=chooser, prefix_index=prefix_index)
    replica_set = spec.get("replica_set") or ""
    if replica_set:  # the replicas come and go: this file says which are there
        dispatcher.set_replicas(read_replica_set(Path(replica_set)))
    admission, dead_letters = shared
    generation = (_FailingGeneration if failing else Generation)(
        tokenizer, dispatcher, spec["name"], admission, dead_letters)
    return generation, replica_set


class _FailingGeneration(Generation):
    """Tests only: a router that fails every request (UNAVAILABLE) while its health
    says SERVING, for Envoy's outlier detection to find."""

    async def complete(self, request, call=Call()):
        raise UnavailableError("test: this router fails every request")

    async def _observed(self, request, call, partial_ok: bool = False):
        await self.complete(request, call)
        yield  # (an async generator, like the real one)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the router's event loop: the router owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _http_server(args, models: Models, model_dirs: dict[str, str],
                 mtls: MtlsFiles | None) -> uvicorn.Server:
    """The OpenAI-compatible HTTP API on --http-port (where gRPC listens), over this
    router's request cores (docs/http-api.md); with `mtls`, over TLS to clients with
    a certificate of the mesh's CA only, as the gRPC port."""
    from llmesh.services.router.http_api.app import OpenAIApi
    api = OpenAIApi(models, {name: _token_text(d) for name, d in model_dirs.items()},
                    heartbeat_s=args.heartbeat_s)
    config = uvicorn.Config(api.app, host=bind_host(), port=args.http_port, http="httptools",
                            loop="none", lifespan="off", log_level="warning", access_log=False,
                            timeout_keep_alive=75, timeout_graceful_shutdown=5,
                            **(uvicorn_ssl(mtls) if mtls else {}))
    return _EmbeddedServer(config)


def _token_text(model_dir: str):
    """A token id's text in the tokenizer of `model_dir` (for logprobs)."""
    from functools import lru_cache

    from llmesh.services.common.tokenizer import TextTokenizer
    tokenizer = TextTokenizer(model_dir)

    @lru_cache(maxsize=65536)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    return token_text


async def _track_health(service: Service, models: Models) -> None:
    """SERVING while at least one replica (of any model) is connected."""
    serving = None
    while True:
        if models.is_ready != serving:
            serving = models.is_ready
            await service.set_serving(serving)
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="llmesh.services.router")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--schedulers", default="",
                   help="the replicas' schedulers, comma-separated (replica-0, ...)")
    p.add_argument("--replica-set", type=Path,
                   help="a JSON file listing the replicas, watched for changes "
                        "(services/router/replica_set.py); instead of --schedulers")
    p.add_argument("--model-name", default="default")
    p.add_argument("--max-message-bytes", type=int, default=4 * 2**20)
    p.add_argument("--admission", default="{}", help="mesh.yaml's admission section as JSON")
    p.add_argument("--max-migrations", type=int, default=3,
                   help="times a request may move to another replica when its own is lost")
    p.add_argument("--replica-wait-s", type=float, default=30.0,
                   help="how long a request waits for a ready replica while they recover")
    p.add_argument("--standby", type=int, default=0,
                   help="the last N schedulers are warm standbys: they take requests only "
                        "while another replica is not ready")
    p.add_argument("--kvcache", default="", help="the kvcache index (prefix-aware routing)")
    p.add_argument("--routing-policy", choices=POLICIES, default="kv_aware")
    p.add_argument("--prefix-load-bound", type=float, default=4.0,
                   help="requests a cached prefix may pull a request above the least load")
    p.add_argument("--prefix-load-ratio", type=float, default=1.5,
                   help="... or this ratio of the least load, if more")
    p.add_argument("--test-fail-requests", action="store_true",
                   help="tests only: fail every request while reporting SERVING")
    p.add_argument("--http-port", type=int, default=0,
                   help="serve the OpenAI-compatible HTTP API here too (0: gRPC only)")
    p.add_argument("--model", type=model_arg, help="the model directory (its tokenizer: logprob token text)")
    p.add_argument("--replica-silence-s", type=float, default=5.0,
                   help="a scheduler that sends nothing for this long is lost (hung)")
    p.add_argument("--models", default="[]",
                   help="more models, as JSON: [{name, tokenizer, replica_set, model}, ...]")
    p.add_argument("--mtls-dir", type=Path,
                   help="serve gRPC and HTTP over TLS to clients with a certificate of this "
                        "directory's CA only (services/common/mtls.py)")
    p.add_argument("--heartbeat-s", type=float, default=15.0,
                   help="SSE comment heartbeat while a stream has nothing to send")
    args = p.parse_args()
    if not args.schedulers and not args.replica_set:
        p.error("one of --schedulers or --replica-set is required")
    telemetry.init("router")
    try:
        asyncio.run(main(args))
    finally:
        telemetry.shutdown()
