"""The public `llmesh.v1.Inference` API: validation, replica choice, streaming."""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque

import grpc

from llmesh.v1 import (common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2,
                       tokenizer_pb2, tokenizer_pb2_grpc)
from llmesh.services.common import convert
from llmesh.services.common.errors import (InvalidRequestError, LimitExceededError, LlmeshError,
                                    PermissionDeniedError, UnauthenticatedError)
from llmesh.services.common.sampling_params import validate_request, validate_resume
from llmesh.services.common.server import abort_with
from llmesh.services.router.admission import Admission, Ticket, arrival_time
from llmesh.services.router.breaker import BUSY, OK
from llmesh.services.router.deadletters import DeadLetters, make_entry
from llmesh.services.router.dispatch import Dispatcher, Route, coalesce
from llmesh.services.router.limits import MemoryLimiter
from llmesh.services.router.tenants import TenantDirectory

from llmesh.observability import telemetry
from llmesh.observability.metrics import router_metrics
from opentelemetry import trace

log = logging.getLogger("llmesh.router")


class Inference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, tokenizer_channel: grpc.aio.Channel, dispatcher: Dispatcher,
                 model_name: str, admission: Admission | None = None,
                 dead_letters: DeadLetters | None = None):
        """`tokenizer_channel` serves Encode and chat templates (a traced hop); text
        comes back from the replicas with their tokens, through `dispatcher`."""
        self.model_name = model_name
        self.admission = admission or Admission(TenantDirectory.open(), MemoryLimiter())
        self._settling: set[asyncio.Task] = set()
        self._rng = random.Random()
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(tokenizer_channel)
        self.dispatcher = dispatcher
        self.dead_letters = dead_letters or DeadLetters()

    @property
    def replicas(self):
        return self.dispatcher.replicas

    # ---- public API -----------------------------------------------------
    async def ListModels(self, request, context):
        models = {}
        for r in self.replicas:
            if r.info is not None:
                models[self.model_name] = inference_pb2.ModelInfo(
                    name=self.model_name, architecture=r.info.architecture,
                    max_model_len=r.info.max_model_len, vocab_size=r.info.vocab_size)
        return inference_pb2.ListModelsResponse(models=list(models.values()))

    async def Tokenize(self, request, context):
        if request.model and request.model != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r} is not served")
        enc = tokenizer_pb2.EncodeRequest(add_special_tokens=True)
        if request.WhichOneof("input") == "chat":
            enc.chat.CopyFrom(request.chat)
        else:
            enc.text = request.text
        resp = await self._encode(enc, context)
        return inference_pb2.TokenizeResponse(token_ids=resp.token_ids)

    async def Complete(self, request, context):
        texts: dict[int, list[str]] = {}
        final: dict[int, inference_pb2.GenerateResponse] = {}
        async for chunk in self._observed(request, context, partial_ok=True):
            texts.setdefault(chunk.index, []).append(chunk.text)
            agg = final.setdefault(chunk.index, inference_pb2.GenerateResponse(
                request_id=chunk.request_id, index=chunk.index))
            agg.token_ids.extend(chunk.token_ids)
            agg.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason:
                agg.finish_reason = chunk.finish_reason
                agg.usage.CopyFrom(chunk.usage)
                agg.timings.CopyFrom(chunk.timings)
                agg.incomplete, agg.incomplete_reason = chunk.incomplete, chunk.incomplete_reason
        if not final:
            await context.abort(grpc.StatusCode.INTERNAL, "no output")
        out = inference_pb2.GenerateResponse()
        out.CopyFrom(final[min(final)])
        out.text = "".join(texts[out.index])
        for index in sorted(final):
            seq = final[index]
            out.choices.add(index=index, text="".join(texts[index]), token_ids=seq.token_ids,
                            logprobs=seq.logprobs, finish_reason=seq.finish_reason)
            if index != out.index:  # usage counts every sequence; timings the slowest
                out.usage.completion_tokens += seq.usage.completion_tokens
                if seq.timings.e2e_s > out.timings.e2e_s:
                    out.timings.CopyFrom(seq.timings)
                if seq.incomplete and not out.incomplete:
                    out.incomplete, out.incomplete_reason = True, seq.incomplete_reason
        return out

    async def Generate(self, request, context):
        async for response in self._observed(request, context):
            yield response

    async def _observed(self, request, context, partial_ok: bool = False):
        request_id = request.request_id or uuid.uuid4().hex
        obs = RequestObserver(request_id, self.model_name, request.sampling.max_tokens)
        metrics = router_metrics()
        metrics.in_flight.inc()
        status = "OK"
        try:
            async for response in self._generate(request, request_id, context, partial_ok):
                obs.on_chunk(response)
                yield response
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            code = context.code() if hasattr(context, "code") else None
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            metrics.in_flight.dec()
            obs.finish(metrics, status)

    async def _generate(self, request, request_id, context, partial_ok: bool):
        arrival_unix_s = arrival_time(context.invocation_metadata() or (), time.time())
        adm = self.admission
        metrics = router_metrics()
        tracer = telemetry.tracer("llmesh.router")
        try:
            with tracer.start_as_current_span("router.auth"):
                tenant, cls = adm.authorize(context.invocation_metadata() or (),
                                            request.model or self.model_name,
                                            convert.PRIORITY_NAMES.get(request.priority))
        except LlmeshError as e:
            metrics.rejections.labels(_reason(e)).inc()
            await abort_with(context, e)
        if request.model and request.model != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r} is not served")
        with tracer.start_as_current_span("router.route") as span:
            # while replicas recover, a request waits for one (bounded) rather than fail
            replica = await self.dispatcher.wait_ready(
                adm.deadline(cls, request.timeout_ms, context.time_remaining()), any_one=True)
            span.set_attribute("llmesh.replica", replica.name if replica else "")
        if replica is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is ready")
        prompt = await self._prompt_ids(request, context)
        # the public parameters become the domain's once, here; the seed is fixed here
        # too, so the request gives the same tokens wherever (and however often) it runs
        params = convert.sampling_from_public(request.sampling)
        if params.seed is None:
            params = params.replace(seed=self._rng.getrandbits(63))
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
            except InvalidRequestError as e:
                metrics.rejections.labels("request_cap").inc()
                raise e
            if self.dispatcher.has(request_id):
                await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                    f"request_id: {request_id!r} in flight")
            with tracer.start_as_current_span("router.limits"):
                reservation = await adm.reserve(tenant, len(prompt), params)
        except LlmeshError as e:
            if isinstance(e, LimitExceededError):
                metrics.rejections.labels(e.reason).inc()
            await abort_with(context, e)
        ticket = Ticket(tenant, cls, adm.deadline(cls, request.timeout_ms, context.time_remaining()),
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
            async for response in self._stream(route, upstream_open, queue, context,
                                               served, partial_ok, dead_letter, resume):
                if first:  # what a client needs to resume this stream if it breaks
                    response.seed, first = params.seed, False
                yield response
        except LimitExceededError as e:  # the replica's queue is full: nothing was computed
            refused = True
            metrics.rejections.labels(e.reason).inc()
            await abort_with(context, e)
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

    async def _stream(self, route: Route, upstream_open, queue, context, served, partial_ok,
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
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica failed: {delta}")
            if delta.error_reason == "draining" \
                    and await self.dispatcher.migrate(route, streamed, delta.error, refused=True):
                continue  # (refused unstarted by a replica about to restart: it goes elsewhere)
            if delta.error:
                if delta.error_code == "RESOURCE_EXHAUSTED":
                    self.dispatcher.record(route, BUSY)  # load, not a broken replica
                    raise LimitExceededError(delta.error_reason or "queue_full", delta.error,
                                             delta.retry_after_ms / 1000)
                code = getattr(grpc.StatusCode, delta.error_code, grpc.StatusCode.INTERNAL)
                await context.abort(code, delta.error)
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
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "deadline exceeded before the request could start")
                yield resp
                if partial_ok:  # Complete: the partial output, marked incomplete
                    continue
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            if finish in (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_ERROR):
                dead_letter("failed by the replica")
                resp.incomplete, resp.incomplete_reason = True, "aborted by the server"
                yield resp
                await context.abort(grpc.StatusCode.UNAVAILABLE, "request aborted by the replica")
            yield resp

    async def _prompt_ids(self, request, context) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "input: one of prompt, chat or token_ids is required")
        enc = tokenizer_pb2.EncodeRequest(add_special_tokens=True)
        if kind == "chat":
            enc.chat.CopyFrom(request.chat)
        else:
            enc.text = request.prompt
        return list((await self._encode(enc, context)).token_ids)

    async def _encode(self, enc, context, attempts: int = 3):
        """Encode through the tokenizer. Encoding has no side effects, so a call the
        tokenizer's death cut off is made again (it waits for the restarted one)."""
        for attempt in range(attempts):
            try:
                return await self.tokenizer.Encode(enc, timeout=30, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    router_metrics().tokenizer_retries.inc()
                    await asyncio.sleep(0.1)
                    continue
                if code != grpc.StatusCode.INVALID_ARGUMENT:
                    code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"tokenizer: {e.details()}")


def _reason(e: LlmeshError) -> str:
    if isinstance(e, UnauthenticatedError):
        return "unauthenticated"
    if isinstance(e, PermissionDeniedError):
        return "permission_denied"
    return getattr(e, "reason", "other")


class RequestObserver:
    """Per-request metrics and span attributes, fed with each chunk sent to the client."""

    def __init__(self, request_id: str, model: str, max_tokens: int):
        self.t0 = time.perf_counter()
        self.first = self.last = 0.0
        self.span = trace.get_current_span()  # the gRPC server span (no-op without tracing)
        self.span.set_attributes({"llmesh.request_id": request_id, "gen_ai.request.model": model,
                                  "gen_ai.request.max_tokens": max_tokens,
                                  "gen_ai.operation.name": "text_completion"})
        self.stream_span = None
        self.finish_reasons: list[str] = []
        self.prompt_tokens = self.output_tokens = 0
        self.queue_s: float | None = None
        self.gaps: list[float] = []

    def on_chunk(self, resp) -> None:
        if resp.token_ids:
            now = time.perf_counter()
            if not self.first:
                self.first = now
                if telemetry.tracing_enabled():
                    self.stream_span = telemetry.tracer("llmesh.router").start_span("stream")
            else:
                self.gaps.append(now - self.last)
            self.last = now
        if resp.finish_reason:
            self.finish_reasons.append(convert.FINISH_NAMES[resp.finish_reason])
            self.prompt_tokens = resp.usage.prompt_tokens
            self.output_tokens += resp.usage.completion_tokens
            if self.queue_s is None and resp.HasField("timings"):
                self.queue_s = resp.timings.queue_s

    def finish(self, m, status: str) -> None:
        if self.first:
            m.ttft.observe(self.first - self.t0)
            m.e2e.observe(self.last - self.t0)
            for gap in self.gaps:
                m.itl.observe(gap)
        if self.queue_s is not None:
            m.queue.observe(self.queue_s)
        m.requests.labels(self.finish_reasons[0] if self.finish_reasons else "none", status).inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.output_tokens)
        if self.stream_span is not None:
            self.stream_span.end()
        self.span.set_attributes({"gen_ai.usage.input_tokens": self.prompt_tokens,
                                  "gen_ai.usage.output_tokens": self.output_tokens,
                                  "gen_ai.response.finish_reasons": self.finish_reasons,
                                  "rpc.grpc.status": status})
