"""The soak's mixed traffic, every request with a known answer.

Four kinds, chosen per request from a seeded draw: plain streams (60%), streams
the client cancels after a few tokens (15%), `n = 2` requests answered whole
(15%), and streams constrained to a JSON object (10%). Prompts are the chaos
benchmark's (`chaos.known_answers`: half text, encoded by the tokenizer; half
token ids; a shared prefix). The answers come from the in-process engine with
the same parameters, converted from the public message as the router converts
them, so a structured request's grammar is the one the mesh compiles. A
cancelled request's answer is the first tokens of the full one.
"""
from __future__ import annotations

import asyncio
import random
import time

KINDS = (("stream", 0.60), ("cancel", 0.15), ("n2", 0.15), ("json", 0.10))
CANCEL_AFTER = 4  # tokens a cancelling client reads before it hangs up


def kind_of(i: int) -> str:
    x = random.Random(f"kind/{i}").random()
    for kind, share in KINDS:
        if x < share:
            return kind
        x -= share
    return KINDS[0][0]


def public_sampling(kind: str, p):
    """The request's public parameters (common_pb2.SamplingParams) for `kind`."""
    from llmesh.v1 import common_pb2
    s = common_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature,
                                  top_p=p.top_p, seed=p.seed, ignore_eos=kind != "json")
    if kind == "n2":
        s.n = 2
    if kind == "json":
        s.structured.json_object = True
    return s


def known_answers(model_dir: str, prompts: list, params: list) -> dict[str, list]:
    """Per kind, per prompt: the engine's choices (token lists) for that kind's parameters."""
    from llmesh.services.common import convert
    from llmesh.services.common.tokenizer import TextTokenizer
    from llmesh.services.engine.engine import Engine, EngineConfig
    tok = TextTokenizer(model_dir)
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
    engine = Engine.from_pretrained(model_dir, EngineConfig(num_kv_blocks=1024))
    out = {}
    for kind in ("stream", "n2", "json"):
        engine_params = [convert.sampling_from_public(public_sampling(kind, p)) for p in params]
        out[kind] = [[c.token_ids for c in choices]
                     for choices in engine.generate(ids, engine_params)]
    engine.close()
    out["cancel"] = [[choices[0][:CANCEL_AFTER]] for choices in out["stream"]]
    return out


def request(kind: str, prompt, p):
    from llmesh.v1 import inference_pb2
    req = inference_pb2.GenerateRequest(sampling=public_sampling(kind, p))
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


async def call(stub, kind: str, req, timeout_s: float) -> dict:
    """One request of `kind`: its status, TTFT and choices (token lists, by index)."""
    import grpc
    t0 = time.monotonic()
    out = {"start": t0, "kind": kind, "status": "OK", "ttft_s": None, "choices": []}
    try:
        if kind == "n2":
            resp = await stub.Complete(req, timeout=timeout_s)
            out["ttft_s"] = time.monotonic() - t0  # (whole answers: their latency)
            out["choices"] = [list(c.token_ids) for c in sorted(resp.choices,
                                                                key=lambda c: c.index)]
        else:
            tokens, stream = [], stub.Generate(req, timeout=timeout_s)
            async for chunk in stream:
                if chunk.token_ids and out["ttft_s"] is None:
                    out["ttft_s"] = time.monotonic() - t0
                tokens += chunk.token_ids
                if kind == "cancel" and len(tokens) >= CANCEL_AFTER:
                    stream.cancel()
                    tokens = tokens[:CANCEL_AFTER]
                    break
            out["choices"] = [tokens]
    except grpc.aio.AioRpcError as e:
        out["status"] = e.code().name
    except asyncio.CancelledError:
        raise
    out["end"] = time.monotonic()
    return out
