"""The public `llmesh.v1.Inference` API over gRPC: a thin adapter over the
router's request core (services/router/generation.py). It passes each call's
metadata and deadline in, streams the responses out, and aborts with the status
of the error the core raised (with its retry hint in the trailers). The request's
`model` picks the core (services/router/models.py)."""
from __future__ import annotations

from contextlib import aclosing

import grpc

from llmesh.v1 import inference_pb2_grpc
from llmesh.services.common.errors import LlmeshError
from llmesh.services.common.server import abort_with
from llmesh.services.router.generation import Call
from llmesh.services.router.models import Models


def call_of(context: grpc.aio.ServicerContext) -> Call:
    return Call(tuple(context.invocation_metadata() or ()), context.time_remaining())


class Inference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, models: Models):
        self.models = models

    async def ListModels(self, request, context):
        return self.models.list_models()

    async def Tokenize(self, request, context):
        try:
            return await self.models.get(request.model).tokenize(request)
        except LlmeshError as e:
            await abort_with(context, e)

    async def Complete(self, request, context):
        try:
            return await self.models.get(request.model).complete(request, call_of(context))
        except LlmeshError as e:
            await abort_with(context, e)

    async def Generate(self, request, context):
        try:
            generation = self.models.get(request.model)
            async with aclosing(generation.generate(request, call_of(context))) as stream:
                async for response in stream:
                    yield response
        except LlmeshError as e:
            await abort_with(context, e)
