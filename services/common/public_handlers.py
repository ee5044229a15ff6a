"""Method handlers for a public service whose requests come from anyone.

grpc's generated handlers decode a request before the servicer sees it, and a
body that does not decode (invalid UTF-8 in a string field, a truncated
message) then ends the call with UNKNOWN. These handlers decode it themselves
and answer INVALID_ARGUMENT instead, naming what was wrong; the servicer's
methods are called only with well-formed messages.
"""
from __future__ import annotations

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError


def public_service_handler(servicer, service_descriptor) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in service_descriptor.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        guard = _guard_stream if method.server_streaming else _guard_unary
        handlers[method.name] = make(guard(behavior), request_deserializer=_decoder(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers)


class _Undecodable:
    def __init__(self, reason: str):
        self.reason = reason


def _decoder(cls):
    def decode(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return _Undecodable(f"the request does not decode as {cls.DESCRIPTOR.full_name}: "
                                f"{e or 'malformed'} (string fields must be valid UTF-8)")
    return decode


def _guard_unary(behavior):
    async def handler(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behavior(request, context)
    return handler


def _guard_stream(behavior):
    async def handler(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        async for response in behavior(request, context):
            yield response
    return handler
