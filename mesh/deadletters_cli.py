"""`llmesh deadletters list | replay`: the mesh's dead letters (docs/mesh.md)."""
from __future__ import annotations

import json
import sys

import grpc

from llmesh.services.router.deadletters import STREAM


def add_parser(sub) -> None:
    dl = sub.add_parser("deadletters", help="requests the mesh could not finish (Redis)")
    dl.add_argument("action", choices=["list", "replay"])
    dl.add_argument("--config", help="mesh.yaml of the running mesh")
    dl.add_argument("--id", action="append", default=[],
                    help="replay only these entries (default: every replayable one)")
    dl.add_argument("--tenant", help="only this tenant's entries (replay with its own key)")
    dl.add_argument("--json", action="store_true")
    dl.add_argument("--api-key", help="API key of a keyed mesh, for replay")


def cmd_deadletters(args) -> int:
    import redis
    from llmesh.mesh.commands import effective_config, read_state, run_dir_of
    cfg = effective_config(args.config)
    if cfg.admission.state != "redis" or not cfg.admission.redis_url:
        print("llmesh: error: dead letters are kept in Redis: set admission.state: redis and "
              "admission.redis_url", file=sys.stderr)
        return 2
    r = redis.Redis.from_url(cfg.admission.redis_url, decode_responses=True, socket_timeout=5)
    entries = [(eid, f) for eid, f in r.xrange(STREAM)
               if args.tenant is None or f.get("tenant") == args.tenant]
    if args.action == "list":
        if args.json:
            print(json.dumps([{"id": eid, **fields} for eid, fields in entries]))
        else:
            for eid, f in entries:
                print(f"{eid}  {f['request_id']}  {f['reason']}  tenant={f['tenant']!r} "
                      f"prompt={f['num_prompt_tokens']} tokens"
                      + ("" if "prompt_token_ids" in f else " (inputs not kept)"))
        return 0
    state = read_state(run_dir_of(cfg))
    if not state or state.get("status") != "ready":
        print("llmesh: error: no mesh is up to replay into", file=sys.stderr)
        return 1
    return _replay(r, entries, state["endpoint"], set(args.id), args.api_key, args.json)


def _replay(r, entries, endpoint: str, only: set[str], api_key: str | None, as_json: bool) -> int:
    """Send each replayable entry again (same tokens, same sampling); an entry that
    completes leaves the stream, one that fails again stays."""
    from llmesh.v1 import inference_pb2, inference_pb2_grpc
    from llmesh.services.common.convert import PRIORITY_VALUES, sampling_to_public
    from llmesh.services.common.sampling_params import SamplingParams
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    results = []
    with grpc.insecure_channel(endpoint) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for eid, f in entries:
            if only and eid not in only:
                continue
            if "prompt_token_ids" not in f:
                results.append({"id": eid, "status": "SKIPPED", "why": "inputs were not kept"})
                continue
            # the same parameters again (seed and structured output included)
            sampling = sampling_to_public(SamplingParams.from_dict(json.loads(f["sampling"])))
            req = inference_pb2.GenerateRequest(
                token_ids=inference_pb2.TokenIds(ids=json.loads(f["prompt_token_ids"])),
                sampling=sampling, priority=PRIORITY_VALUES.get(f["priority"], 0))
            try:
                out = stub.Complete(req, timeout=300, metadata=metadata)
                status = "INCOMPLETE" if out.incomplete else "OK"
            except grpc.RpcError as e:
                status = e.code().name
            if status == "OK":
                r.xdel(STREAM, eid)
            results.append({"id": eid, "request_id": f["request_id"], "status": status})
    for res in results:
        print(json.dumps(res) if as_json else f"{res['id']}  {res['status']}")
    return 0 if all(res["status"] in ("OK", "SKIPPED") for res in results) else 1
