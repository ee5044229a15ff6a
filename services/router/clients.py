"""The router's clients of its peers over gRPC, with the domain's errors: the
tokenizer (Encode, chat templates) and the kvcache prefix index (Match). The
request core (services/router/generation.py) calls these and never sees grpc."""
from __future__ import annotations

import asyncio

import grpc

from llmesh.v1 import kvcache_pb2, kvcache_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from llmesh.observability.metrics import router_metrics
from llmesh.services.common.errors import UpstreamError


class TokenizerClient:
    def __init__(self, channel: grpc.aio.Channel, attempts: int = 3):
        self.stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self.attempts = attempts

    async def encode(self, request: tokenizer_pb2.EncodeRequest) -> list[int]:
        """The request's token ids (see `encode_response`)."""
        return list((await self.encode_response(request)).token_ids)

    async def encode_response(self, request: tokenizer_pb2.EncodeRequest
                              ) -> tokenizer_pb2.EncodeResponse:
        """The request's token ids (and, for a chat with tools, the model's tool-call
        format). Encoding has no side effects, so a call the tokenizer's death cut
        off is made again (it waits for the restarted one). Raises UpstreamError:
        INVALID_ARGUMENT for input the tokenizer refuses, UNAVAILABLE for anything else."""
        for attempt in range(self.attempts):
            try:
                return await self.stub.Encode(request, timeout=30, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt + 1 < self.attempts:
                    router_metrics().tokenizer_retries.inc()
                    await asyncio.sleep(0.1)
                    continue
                name = "INVALID_ARGUMENT" if code == grpc.StatusCode.INVALID_ARGUMENT \
                    else "UNAVAILABLE"
                raise UpstreamError(name, f"tokenizer: {e.details()}") from None
        raise AssertionError("unreachable")


class PrefixIndex:
    """What each replica holds of a prompt, per the kvcache index."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 0.05):
        self.stub = kvcache_pb2_grpc.KVCacheStub(channel)
        self.timeout_s = timeout_s

    async def match(self, prompt: list[int], salt: str) -> dict[str, int]:
        """Prompt tokens cached per replica name; {} when the index is slow (past
        `timeout_s`) or away: the choice then goes by load alone."""
        try:
            resp = await self.stub.Match(kvcache_pb2.MatchRequest(token_ids=prompt, salt=salt),
                                         timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return {}
        return {m.replica: m.num_tokens for m in resp.replicas}
