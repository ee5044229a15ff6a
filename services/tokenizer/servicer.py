"""Tokenizer gRPC servicer: Encode (text and chat templates) and Decode. Streamed
text is made by the schedulers, with their tokens."""
from __future__ import annotations

import grpc

from llmesh.observability.metrics import tokenizer_requests
from llmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from llmesh.services.common.errors import LlmeshError
from llmesh.services.common.server import abort_with
from llmesh.services.common.tokenizer import TextTokenizer


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    async def Encode(self, request, context):
        tokenizer_requests().labels("encode").inc()
        try:
            if request.WhichOneof("input") == "chat":
                ids = self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in request.chat.messages])
            else:
                ids = self.tokenizer.encode(request.text, request.add_special_tokens)
        except LlmeshError as e:
            await abort_with(context, e)
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def Decode(self, request, context):
        tokenizer_requests().labels("decode").inc()
        if any(t >= self.tokenizer.vocab_size for t in request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_ids: outside the vocabulary")
        return tokenizer_pb2.DecodeResponse(
            text=self.tokenizer.decode(list(request.token_ids), request.skip_special_tokens))
