"""The router's request core, free of grpc: encode, authorize, validate, admit,
choose a replica, dispatch, stream, migrate and resume one request.

gRPC (services/router/servicer.py) and the HTTP API (services/router/http_api)
are thin adapters over `Generation`: they pass a request (the public proto
messages, the contract both share) with its `Call` (metadata and the client's
deadline), read the responses, and turn a raised `LlmeshError` into their own
status (gRPC code, HTTP status and JSON body).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from llmesh.v1 import common_pb2, inference_pb2, scheduler_pb2, tokenizer_pb2
from llmesh.observability import telemetry
from llmesh.observability.metrics import router_metrics
from llmesh.services.common import convert
from llmesh.services.common.errors import (DeadlineExceededError, DuplicateRequestError,
                                           InvalidRequestError, LimitExceededError, LlmeshError,
                                           NotFoundError, PermissionDeniedError,
                                           UnauthenticatedError, UnavailableError, UpstreamError)
from llmesh.services.common.sampling_params import validate_request, validate_resume
from llmesh.services.router.admission import Admission, Ticket, arrival_time
from llmesh.services.router.breaker import BUSY, OK
from llmesh.services.router.deadletters import DeadLetters, make_entry
from llmesh.services.router.dispatch import Dispatcher, Route, coalesce
from llmesh.services.router.return_lag import ReturnLag
from llmesh.services.router.tools import ToolUse
from llmesh.services.router.observer import RequestObserver

log = logging.getLogger("llmesh.router")


@dataclass(frozen=True)
class Call:
    """What an adapter passes of one call: its metadata (the API key, when the
    gateway saw the request) and the client's own deadline, if it set one."""

    metadata: tuple = ()
    time_remaining_s: float | None = None


class Generation:
    def __init__(self, tokenizer, dispatcher: Dispatcher, model_name: str,
                 admission: Admission, dead_letters: DeadLetters | None = None):
        """`tokenizer` encodes prompts and chat templates (`encode`: a traced hop,
        services/router/clients.py); text comes back from the replicas with their
        tokens, through `dispatcher`."""
        self.model_name = model_name
        self.admission = admission
        self.tokenizer = tokenizer
        self.dispatcher = dispatcher
        self.dead_letters = dead_letters or DeadLetters()
        self._settling: set[asyncio.Task] = set()
        self.return_lag = ReturnLag()

    @property
    def is_ready(self) -> bool:
        """True while some replica takes requests (the router's health)."""
        return self.dispatcher.is_ready

    def list_models(self) -> inference_pb2.ListModelsResponse:
        models = {}
        for r in self.dispatcher.replicas:
            if r.info is not None:
                models[self.model_name] = inference_pb2.ModelInfo(
                    name=self.model_name, architecture=r.info.architecture,
                    max_model_len=r.info.max_model_len, vocab_size=r.info.vocab_size)
        return inference_pb2.ListModelsResponse(models=list(models.values()))

    async def tokenize(self, request) -> inference_pb2.TokenizeResponse:
        self._check_model(request.model)
        enc = tokenizer_pb2.EncodeRequest(add_special_tokens=True)
        if request.WhichOneof("input") == "chat":
            enc.chat.CopyFrom(request.chat)
        else:
            enc.text = request.text
        return inference_pb2.TokenizeResponse(token_ids=await self.tokenizer.encode(enc))

    async def complete(self, request, call: Call = Call()) -> inference_pb2.GenerateResponse:
        """The whole output at once: every choice, and a partial output (marked
        incomplete) when the deadline cut it short."""
        texts: dict[int, list[str]] = {}
        final: dict[int, inference_pb2.GenerateResponse] = {}
        async for chunk in self._observed(request, call, partial_ok=True):
            texts.setdefault(chunk.index, []).append(chunk.text)
            agg = final.setdefault(chunk.index, inference_pb2.GenerateResponse(
                request_id=chunk.request_id, index=chunk.index))
            agg.token_ids.extend(chunk.token_ids)
            agg.logprobs.extend(chunk.logprobs)
            agg.tool_calls.extend(chunk.tool_calls)
            if chunk.finish_reason:
                agg.finish_reason = chunk.finish_reason
                agg.usage.CopyFrom(chunk.usage)
                agg.timings.CopyFrom(chunk.timings)
                agg.incomplete, agg.incomplete_reason = chunk.incomplete, chunk.incomplete_reason
        if not final:
            raise UpstreamError("INTERNAL", "no output")
        out = inference_pb2.GenerateResponse()
        out.CopyFrom(final[min(final)])
        out.text = "".join(texts[out.index])
        for index in sorted(final):
            seq = final[index]
            out.choices.add(index=index, text="".join(texts[index]), token_ids=seq.token_ids,
                            logprobs=seq.logprobs, finish_reason=seq.finish_reason,
                            tool_calls=seq.tool_calls)
            if index != out.index:  # usage counts every sequence; timings the slowest
                out.usage.completion_tokens += seq.usage.completion_tokens
                if seq.timings.e2e_s > out.timings.e2e_s:
                    out.timings.CopyFrom(seq.timings)
                if seq.incomplete and not out.incomplete:
                    out.incomplete, out.incomplete_reason = True, seq.incomplete_reason
        return out

    def generate(self, request, call: Call = Call()):
        """The request's responses as they come (an async iterator); raises an
        LlmeshError for a request refused or a stream that ends early (after a
        last response marked `incomplete`, when the failure came mid-stream)."""
        return self._observed(request, call)

    async def _observed(self, request, call: Call, partial_ok: bool = False):
        request_id = request.request_id or uuid.uuid4().hex
        obs = RequestObserver(request_id, self.model_name, request.sampling.max_tokens)
        metrics = router_metrics()
        metrics.in_flight.inc()
        status = "OK"
        try:
            tools = ToolUse.of(request)
            responses = self._generate(request, request_id, call, partial_ok, tools)
            async for response in (tools.parse(responses) if tools else responses):
                obs.on_chunk(response)
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except LlmeshError as e:
            status = e.code
            raise
        except BaseException:
            status = "UNKNOWN"
            raise
        finally:
            metrics.in_flight.dec()
            obs.finish(metrics, status)

    def _check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFoundError(f"model: {model!r} is not served")

    async def _generate(self, request, request_id: str, call: Call, partial_ok: bool,
                        tools: ToolUse | None):
        # (earlier by how late this router passes first tokens on: the replica's TTFT
        # budget then covers the way back too)
        arrival_unix_s = arrival_time(call.metadata, time.time()) - self.return_lag.margin_s()
        adm = self.admission
        metrics = router_metrics()
        tracer = telemetry.tracer("llmesh.router")
        try:
            with tracer.start_as_current_span("router.auth"):
                tenant, cls = adm.authorize(call.metadata, request.model or self.model_name,
                                            convert.PRIORITY_NAMES.get(request.priority))
        except LlmeshError as e:
            metrics.rejections.labels(_reason(e)).inc()
            raise
        self._check_model(request.model)
        refusal = self.dispatcher.refusing(cls)
        if refusal is not None:  # every replica would refuse it: at once, before any work
            metrics.rejections.labels(refusal.reason).inc()
            why = "queue full" if refusal.reason == "queue_full" else "past its TTFT budget"
            raise LimitExceededError(refusal.reason, f"every replica refuses {cls} requests "
                                     f"now ({why})", refusal.retry_after_s)
        with tracer.start_as_current_span("router.route") as span:
            # while replicas recover, a request waits for one (bounded) rather than fail
            replica = await self.dispatcher.wait_ready(
                adm.deadline(cls, request.timeout_ms, call.time_remaining_s), any_one=True)
            span.set_attribute("llmesh.replica", replica.name if replica else "")
        if replica is None:
            raise UnavailableError("no replica is ready")
        if tools:
            tools.constrain(request)
        prompt, tool_format = await self._prompt_ids(request)
        if tools:
            tools.format = tool_format or tools.format
        # the public parameters become the domain's once, here; the seed is fixed here
        # too, so the request gives the same tokens wherever (and however often) it runs
        params = convert.sampling_from_public(request.sampling).with_seed()
        info = replica.info
        if params.max_tokens == 0:  # as much as the context (and the tenant's cap) leaves
            room = min(info.max_model_len, info.num_kv_blocks * info.block_size) - len(prompt)
            cap = adm.output_cap(tenant)
            params = params.replace(max_tokens=max(1, min(room, cap) if cap else room))
        try:
            with tracer.start_as_current_span("router.validate"):
                validate_request(prompt, params, info.vocab_size, info.max_model_len,
                                 info.num_kv_blocks * info.block_size)
                resume = list(request.resume_token_ids)
                if resume:
                    validate_resume(resume, params, info.vocab_size)
            try:
                adm.check_caps(tenant, len(prompt), params)
            except InvalidRequestError:
                metrics.rejections.labels("request_cap").inc()
                raise
            if self.dispatcher.has(request_id):
                raise DuplicateRequestError(request_id)
            with tracer.start_as_current_span("router.limits"):
                reservation = await adm.reserve(tenant, len(prompt), params)
        except LimitExceededError as e:
            metrics.rejections.labels(e.reason).inc()
            raise
        ticket = Ticket(tenant, cls, adm.deadline(cls, request.timeout_ms, call.time_remaining_s),
                        adm.salt(tenant), reservation)
        queue = self.dispatcher.open(request_id)
        add = scheduler_pb2.AddRequest(request_id=request_id, prompt_token_ids=prompt,
                                       sampling=convert.sampling_to_wire(params),
                                       deadline_unix_s=ticket.deadline_s,
                                       salt=ticket.salt, traceparent=telemetry.inject(),
                                       tenant=tenant.name,
                                       priority=convert.PRIORITY_VALUES[cls],
                                       resume_token_ids=resume, arrival_unix_s=arrival_unix_s)
        route = Route(request_id, add)
        upstream_open = set(range(params.n))  # sequences the replica has not finished
        served = [0]  # output tokens that reached this router
        refused = False
        try:
            with tracer.start_as_current_span("router.choose") as span:
                # by load and by the prompt's cached prefix (`replica` above: any ready one)
                replica = await self.dispatcher.choose(prompt, ticket.salt,
                                                       ticket.deadline_s) or replica
                span.set_attribute("llmesh.replica", replica.name)
            await self.dispatcher.submit(route, replica)

            def dead_letter(reason: str) -> None:  # fired and forgotten
                entry = make_entry(request_id, reason, tenant.name, tenant.log_inputs,
                                   request.model or self.model_name, cls, params, prompt)
                self._background(self.dead_letters.add(entry))
            first = True
            async for response in self._stream(route, upstream_open, queue, served,
                                               partial_ok, dead_letter, resume):
                if first:  # what a client needs to resume this stream if it breaks
                    response.seed, first = params.seed, False
                    self.return_lag.observe(response.emitted_unix_s)
                yield response
        except LimitExceededError as e:  # the replica's queue is full: nothing was computed
            refused = True
            metrics.rejections.labels(e.reason).inc()
            raise
        finally:
            if upstream_open:  # the client went away: free it upstream now
                await self.dispatcher.cancel(route)
            self.dispatcher.close(route)
            if not refused:
                metrics.tenant_tokens.labels(tenant.name, "prompt").inc(len(prompt))
                metrics.tenant_tokens.labels(tenant.name, "output").inc(served[0])
            # settled in the background: this may run in a cancelled handler
            self._background(adm.give_back(ticket) if refused else adm.settle(ticket, served[0]))

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _stream(self, route: Route, upstream_open, queue, served, partial_ok,
                      dead_letter, resume: list[int]):
        request_id = route.request_id
        unfinished = set(upstream_open)
        pending: deque = deque()
        # the output so far of each choice the client still waits for (a resumed
        # request's starts with what its client has): what a move resumes after
        streamed: dict[int, list[int]] = {i: [] for i in unfinished}
        if resume:  # (n = 1)
            streamed[0] = list(resume)
        while unfinished:
            if not pending:
                pending.extend(await queue.take())
            delta = coalesce(pending)
            if isinstance(delta, str):  # the replica went away under this request
                pending.clear()  # (nothing else can come from it)
                if await self.dispatcher.migrate(route, streamed, delta):
                    continue
                dead_letter(f"replica lost: {delta}")
                yield inference_pb2.GenerateResponse(
                    request_id=request_id, incomplete=True, incomplete_reason=delta)
                raise UnavailableError(f"replica failed: {delta}")
            if delta.error_reason == "draining" \
                    and await self.dispatcher.migrate(route, streamed, delta.error, refused=True):
                continue  # (refused unstarted by a replica about to restart: it goes elsewhere)
            if delta.error:
                if delta.error_code == "RESOURCE_EXHAUSTED":
                    self.dispatcher.record(route, BUSY)  # load, not a broken replica
                    raise LimitExceededError(delta.error_reason or "queue_full", delta.error,
                                             delta.retry_after_ms / 1000)
                raise UpstreamError(delta.error_code or "INTERNAL", delta.error)
            if delta.finish_reason == common_pb2.FINISH_REASON_ERROR and not delta.new_token_ids \
                    and await self.dispatcher.migrate(route, streamed, "the replica failed it"):
                continue  # (a replica that failed or ejected itself: the request moves)
            served[0] += len(delta.new_token_ids)
            finish = delta.finish_reason
            if finish:
                upstream_open.discard(delta.index)
            if delta.index not in unfinished:
                continue
            if finish:
                streamed.pop(delta.index, None)  # (done: a move does not redo it)
            else:
                streamed[delta.index].extend(delta.new_token_ids)
            resp = inference_pb2.GenerateResponse(
                request_id=request_id, index=delta.index, text=delta.text,
                token_ids=delta.new_token_ids, logprobs=delta.logprobs, finish_reason=finish,
                emitted_unix_s=delta.emitted_unix_s)
            if not finish:
                yield resp
                continue
            unfinished.discard(delta.index)
            if not unfinished and finish in (common_pb2.FINISH_REASON_STOP,
                                             common_pb2.FINISH_REASON_LENGTH):
                self.dispatcher.record(route, OK)
            resp.usage.CopyFrom(delta.usage)
            resp.timings.CopyFrom(delta.timings)
            if finish == common_pb2.FINISH_REASON_DEADLINE:
                dead_letter("deadline exceeded")
                resp.incomplete, resp.incomplete_reason = True, "deadline exceeded"
                if not delta.usage.completion_tokens:  # still queued: never computed
                    router_metrics().rejections.labels("deadline").inc()
                    raise DeadlineExceededError(
                        "deadline exceeded before the request could start")
                yield resp
                if partial_ok:  # Complete: the partial output, marked incomplete
                    continue
                raise DeadlineExceededError("deadline exceeded")
            if finish in (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_ERROR):
                dead_letter("failed by the replica")
                resp.incomplete, resp.incomplete_reason = True, "aborted by the server"
                yield resp
                raise UnavailableError("request aborted by the replica")
            yield resp

    async def _prompt_ids(self, request) -> tuple[list[int], str]:
        """(the prompt's token ids, how the model writes tool calls: for a chat with tools)"""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids), ""
        if kind is None:
            raise InvalidRequestError("input", "one of prompt, chat or token_ids is required")
        enc = tokenizer_pb2.EncodeRequest(add_special_tokens=True)
        if kind == "chat":
            enc.chat.CopyFrom(request.chat)
        else:
            enc.text = request.prompt
        resp = await self.tokenizer.encode_response(enc)
        return list(resp.token_ids), resp.tool_format


def _reason(e: LlmeshError) -> str:
    if isinstance(e, UnauthenticatedError):
        return "unauthenticated"
    if isinstance(e, PermissionDeniedError):
        return "permission_denied"
    return getattr(e, "reason", "other")
