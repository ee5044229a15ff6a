"""The OpenAI-compatible HTTP API (Starlette): thin handlers that parse a body,
call the router's request core (services/router/generation.py, the same one
its gRPC API adapts), and answer in OpenAI's shapes.

    POST /v1/chat/completions   POST /v1/completions   (stream: true | false)
    GET  /v1/models   GET /v1/models/{id}   GET /health

`Authorization: Bearer KEY` goes to the router as the gRPC API's key, so
tenants, priorities, limits and quotas are the same on both APIs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid

from opentelemetry import trace
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmesh.observability import telemetry
from llmesh.services.common.errors import LlmeshError
from llmesh.services.router.admission import GATEWAY_START_HEADER
from llmesh.services.router.generation import Call
from llmesh.services.router.http_api.errors import ApiError, from_error, invalid
from llmesh.services.router.http_api.requests import ParsedRequest, parse_chat, parse_completion
from llmesh.services.router.http_api.responses import Formatter, TokenText, usage_dict
from llmesh.services.router.http_api.streams import DirectUpstream, SseResponse, SseStream, Upstream
from llmesh.services.router.models import Models

log = logging.getLogger("llmesh.router.http")
MAX_BODY_BYTES = 32 * 1024 * 1024
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class OpenAIApi:
    """Collaborators: `models`, the router's request core of each served model, and
    `token_texts`: per model name, a token id's text (for logprobs)."""

    def __init__(self, models: Models, token_texts: dict[str, TokenText],
                 heartbeat_s: float = 15.0, first_event_wait_s: float = 5.0):
        self.served = models
        self.token_texts = token_texts
        self.heartbeat_s = heartbeat_s
        self.first_event_wait_s = first_event_wait_s
        self.requests = Counter("llmesh_http_requests", "HTTP API requests by path and status",
                                ["path", "status"])
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.healthz, methods=["GET"]),
        ], exception_handlers={ApiError: self._error, 404: self._not_found,
                               405: self._not_allowed})

    # ---- errors ----------------------------------------------------------------
    async def _error(self, request: Request, e: ApiError) -> Response:
        self.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    async def _not_found(self, request: Request, exc) -> Response:
        return await self._error(request, ApiError(404, f"no route {request.url.path}",
                                                   "not_found_error"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        return await self._error(request, ApiError(405, f"{request.method} is not allowed here",
                                                   "invalid_request_error"))

    # ---- inputs ------------------------------------------------------------------
    async def _body(self, request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise invalid("", f"the body is not valid JSON: {str(e)[:200]}") from None

    def _call(self, request: Request) -> Call:
        """What the core reads of the headers (as of gRPC metadata): the API key,
        and when the request reached the gateway."""
        stamp = request.headers.get(GATEWAY_START_HEADER)
        metadata = ((GATEWAY_START_HEADER, stamp),) if stamp is not None else ()
        auth = request.headers.get("authorization")
        if auth is None:
            return Call(metadata)
        if not auth.isascii() or not auth.isprintable():
            raise ApiError(401, "the Authorization header is not a valid API key",
                           "authentication_error")
        return Call((("authorization", auth),) + metadata)

    # ---- endpoints ---------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, parse_chat(await self._body(request), request.headers))

    async def completions(self, request: Request) -> Response:
        return await self._serve(request,
                                 parse_completion(await self._body(request), request.headers))

    async def _serve(self, request: Request, parsed: ParsedRequest) -> Response:
        call = self._call(request)
        request_id = uuid.uuid4().hex
        for i, req in enumerate(parsed.requests):
            req.request_id = request_id if len(parsed.requests) == 1 else f"{request_id}-{i}"
        try:
            generation = self.served.get(parsed.model)
        except LlmeshError as e:  # (OpenAI's answer to an unknown model)
            raise ApiError(404, str(e), "invalid_request_error", "model",
                           "model_not_found") from None
        fmt = Formatter(parsed.kind, generation.model_name, request_id,
                        parsed.logprobs, self.token_texts[generation.model_name])
        ctx = telemetry.extract(request.headers.get("traceparent", ""))
        span = telemetry.tracer("llmesh.router.http").start_span(
            f"POST {request.url.path}", context=ctx, kind=trace.SpanKind.SERVER)
        path = request.url.path
        with trace.use_span(span, end_on_exit=False):
            if parsed.stream:
                return await self._stream(generation, path, parsed, fmt, call, span)
        try:
            with trace.use_span(span, end_on_exit=False):
                body = await self._whole(generation, request, parsed, fmt, call)
        finally:
            span.end()
        self.requests.labels(path, "200").inc()
        return JSONResponse(body)

    async def _stream(self, generation, path, parsed, fmt, call: Call, span) -> Response:
        upstream = (DirectUpstream(generation, parsed.requests[0], call)
                    if len(parsed.requests) == 1
                    else Upstream(generation, parsed.requests, call))
        # an error before the first event (validation, auth, limits) is an HTTP status
        first = await upstream.next(self.first_event_wait_s)
        if first is not None and isinstance(first[1], ApiError):
            upstream.cancel()
            span.end()
            raise first[1]

        def on_end(outcome: str) -> None:
            self.requests.labels(path, "200" if outcome == "ok" else f"200-{outcome}").inc()
            span.end()
        # heartbeats come from the response (when nothing was sent for a while), so
        # the stream reads its upstream without a timer per event
        stream = SseStream(upstream, fmt, parsed.n, parsed.include_usage,
                           first, on_end, parsed.include_timing, parsed.json_fragments)
        return SseResponse(stream.__aiter__(), self.heartbeat_s, SSE_HEADERS)

    async def _whole(self, generation, request: Request, parsed, fmt, call: Call) -> dict:
        tasks = [asyncio.ensure_future(generation.complete(req, call))
                 for req in parsed.requests]
        results = asyncio.ensure_future(asyncio.gather(*tasks))
        results.add_done_callback(lambda f: f.cancelled() or f.exception())  # (retrieved)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((results, gone), return_when=asyncio.FIRST_COMPLETED)
            if not results.done():  # the client went away: stop generating
                raise ApiError(499, "the client closed the connection", "cancelled")
            try:
                responses = results.result()
            except LlmeshError as e:
                raise from_error(e) from None
        finally:
            gone.cancel()
            for task in tasks:
                task.cancel()
        choices, usage = [], [0, 0, 0]
        for p, resp in enumerate(responses):
            seqs = list(resp.choices) or [resp]
            choices.extend((p * parsed.n + c.index, c) for c in seqs)
            usage[0] += resp.usage.prompt_tokens
            usage[1] += resp.usage.completion_tokens
            usage[2] += resp.usage.cached_prompt_tokens
        body = fmt.whole(choices, usage_dict(*usage))
        incomplete = [r.incomplete_reason for r in responses if r.incomplete]
        if incomplete:
            body["incomplete"], body["incomplete_reason"] = True, incomplete[0]
        return body

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self._model_list()})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model_id"]
        for m in await self._model_list():
            if m["id"] == wanted:
                return JSONResponse(m)
        raise ApiError(404, f"model {wanted!r} is not served here (served: "
                       f"{', '.join(self.served.names)})", "invalid_request_error", "model",
                       "model_not_found")

    async def _model_list(self) -> list[dict]:
        resp = self.served.list_models()
        return [{"id": m.name, "object": "model", "created": 0, "owned_by": "llmesh",
                 "max_model_len": m.max_model_len} for m in resp.models]

    async def healthz(self, request: Request) -> Response:
        """200 while the router has a replica that takes requests (what its gRPC
        health says: Envoy's health check of this API)."""
        ok = self.served.is_ready
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
