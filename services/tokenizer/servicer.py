"""Tokenizer gRPC servicer: Encode (text and chat templates) and Decode. Streamed
text is made by the schedulers, with their tokens."""
from __future__ import annotations

import grpc

from llmesh.observability.metrics import tokenizer_requests
from llmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from llmesh.services.common.convert import chat_from_proto
from llmesh.services.common.errors import LlmeshError
from llmesh.services.common.server import abort_with
from llmesh.services.common.tokenizer import TextTokenizer


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    async def Encode(self, request, context):
        tokenizer_requests().labels("encode").inc()
        try:
            tool_format = ""
            if request.WhichOneof("input") == "chat":
                messages, tools = chat_from_proto(request.chat)
                ids = self.tokenizer.apply_chat_template(messages, tools=tools)
                tool_format = self.tokenizer.tool_format if tools else ""
            else:
                ids = self.tokenizer.encode(request.text, request.add_special_tokens)
        except LlmeshError as e:
            await abort_with(context, e)
        return tokenizer_pb2.EncodeResponse(token_ids=ids, tool_format=tool_format)

    async def Decode(self, request, context):
        tokenizer_requests().labels("decode").inc()
        if any(t >= self.tokenizer.vocab_size for t in request.token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_ids: outside the vocabulary")
        return tokenizer_pb2.DecodeResponse(
            text=self.tokenizer.decode(list(request.token_ids), request.skip_special_tokens))
