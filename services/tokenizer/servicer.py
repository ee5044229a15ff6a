"""Tokenizer gRPC servicer: Encode / Decode, and one Detokenize stream per router
carrying one message per engine step."""
from __future__ import annotations

import grpc

from observability.metrics import tokenizer_requests
from llmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.errors import LlmeshError
from services.common.server import abort_with
from services.common.tokenizer import IncrementalDetokenizer, TextTokenizer


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

    async def Detokenize(self, request_iterator, context):
        states: dict[str, IncrementalDetokenizer] = {}
        async for batch in request_iterator:
            deltas = []
            for item in batch.items:
                detok = states.get(item.seq_key)
                if detok is None:
                    detok = states[item.seq_key] = IncrementalDetokenizer(self.tokenizer)
                text = detok.push(list(item.new_token_ids))
                if item.is_last:
                    text += detok.flush()
                    del states[item.seq_key]
                deltas.append(text)
            yield tokenizer_pb2.DetokenizeResponse(batch_id=batch.batch_id, text_deltas=deltas)
