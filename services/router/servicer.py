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
from services.common import convert
from services.common.errors import (InvalidRequestError, LimitExceededError, LlmeshError,
                                    PermissionDeniedError, UnauthenticatedError)
from services.common.sampling_params import validate_request
from services.common.server import abort_with
from services.router.admission import Admission, Ticket
from services.router.core import ReplicaLoad, pick_replica
from services.router.limits import MemoryLimiter
from services.router.tenants import TenantDirectory
from services.router.replicas import Replica

from observability import telemetry
from observability.metrics import router_metrics
from opentelemetry import trace

log = logging.getLogger("llmesh.router")


class Inference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, tokenizer_channel: grpc.aio.Channel, scheduler_addresses: list[str],
                 model_name: str, admission: Admission | None = None):
        """`tokenizer_channel` serves Encode and chat templates (a traced hop); text
        comes back from the replicas with their tokens."""
        self.model_name = model_name
        self.admission = admission or Admission(TenantDirectory.open(), MemoryLimiter())
        self._settling: set[asyncio.Task] = set()
        self._rng = random.Random()
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(tokenizer_channel)
        self.replicas = [Replica(f"replica-{i}", a, self._on_outputs, self._on_lost)
                         for i, a in enumerate(scheduler_addresses)]
        self._queues: dict[str, Inbox] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(r.run()) for r in self.replicas]

    @property
    def is_ready(self) -> bool:
        return any(r.is_ready for r in self.replicas)

    # ---- replica side ---------------------------------------------------
    def _on_outputs(self, replica: Replica, outputs: scheduler_pb2.StepOutputs) -> None:
        """One step's deltas of one replica, to their requests' queues (never waits)."""
        for d in outputs.deltas:
            queue = self._queues.get(d.request_id)
            if queue is not None:
                queue.put(d)

    def _on_lost(self, replica: Replica, request_ids: set[str], reason: str) -> None:
        for request_id in request_ids:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put(reason)

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
        first = final[min(final)]
        first.text = "".join(texts[first.index])
        return first

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
            replica_name = pick_replica([ReplicaLoad(r.name, r.is_ready, len(r.in_flight))
                                         for r in self.replicas])
            span.set_attribute("llmesh.replica", replica_name or "")
        if replica_name is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is ready")
        replica = next(r for r in self.replicas if r.name == replica_name)
        prompt = await self._prompt_ids(request, context)
        # the public parameters become the domain's once, here; the seed is fixed here
        # too, so the request gives the same tokens wherever (and however often) it runs
        params = convert.sampling_from_public(request.sampling)
        if params.seed is None:
            params = params.replace(seed=self._rng.getrandbits(63))
        try:
            with tracer.start_as_current_span("router.validate"):
                info = replica.info
                validate_request(prompt, params, info.vocab_size, info.max_model_len,
                                 info.num_kv_blocks * info.block_size)
            try:
                adm.check_caps(tenant, len(prompt), params)
            except InvalidRequestError as e:
                metrics.rejections.labels("request_cap").inc()
                raise e
            if request_id in self._queues:
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
        queue = Inbox()
        self._queues[request_id] = queue
        replica.in_flight.add(request_id)
        add = scheduler_pb2.AddRequest(request_id=request_id, prompt_token_ids=prompt,
                                       sampling=convert.sampling_to_wire(params),
                                       deadline_unix_s=ticket.deadline_s,
                                       salt=ticket.salt, traceparent=telemetry.inject(),
                                       tenant=tenant.name,
                                       priority=convert.PRIORITY_VALUES[cls])
        upstream_open = set(range(params.n))  # sequences the replica has not finished
        served = [0]  # output tokens that reached this router
        refused = False
        try:
            await replica.send(scheduler_pb2.RouterMessage(add=add))
            async for response in self._stream(request_id, upstream_open, queue, context,
                                               served, partial_ok):
                yield response
        except LimitExceededError as e:  # the replica's queue is full: nothing was computed
            refused = True
            metrics.rejections.labels(e.reason).inc()
            await abort_with(context, e)
        finally:
            self._queues.pop(request_id, None)
            if upstream_open and request_id in replica.in_flight and replica.is_ready:
                # the client went away: free it upstream now
                try:
                    await replica.send(scheduler_pb2.RouterMessage(
                        cancel=scheduler_pb2.CancelRequest(request_id=request_id)))
                except Exception:  # the replica is gone; it frees everything itself
                    pass
            replica.in_flight.discard(request_id)
            if not refused:
                metrics.tenant_tokens.labels(tenant.name, "prompt").inc(len(prompt))
                metrics.tenant_tokens.labels(tenant.name, "output").inc(served[0])
            # settled in the background: this may run in a cancelled handler
            task = asyncio.ensure_future(adm.give_back(ticket) if refused
                                         else adm.settle(ticket, served[0]))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _stream(self, request_id, upstream_open, queue, context, served, partial_ok):
        unfinished = set(upstream_open)
        pending: deque = deque()
        while unfinished:
            if not pending:
                pending.extend(await queue.take())
            delta = _coalesce(pending)
            if isinstance(delta, str):  # the replica went away under this request
                yield inference_pb2.GenerateResponse(
                    request_id=request_id, incomplete=True, incomplete_reason=delta)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica failed: {delta}")
            if delta.error:
                if delta.error_code == "RESOURCE_EXHAUSTED":
                    raise LimitExceededError("queue_full", delta.error, delta.retry_after_ms / 1000)
                code = getattr(grpc.StatusCode, delta.error_code, grpc.StatusCode.INTERNAL)
                await context.abort(code, delta.error)
            served[0] += len(delta.new_token_ids)
            finish = delta.finish_reason
            if finish:
                upstream_open.discard(delta.index)
            if delta.index not in unfinished:
                continue
            resp = inference_pb2.GenerateResponse(
                request_id=request_id, index=delta.index, text=delta.text,
                token_ids=delta.new_token_ids, logprobs=delta.logprobs, finish_reason=finish)
            if not finish:
                yield resp
                continue
            unfinished.discard(delta.index)
            resp.usage.CopyFrom(delta.usage)
            resp.timings.CopyFrom(delta.timings)
            if finish == common_pb2.FINISH_REASON_DEADLINE:
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

    async def _encode(self, enc, context):
        try:
            return await self.tokenizer.Encode(enc, timeout=30)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code not in (grpc.StatusCode.INVALID_ARGUMENT,):
                code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"tokenizer: {e.details()}")


class Inbox:
    """A request's deltas as they arrive from its replica; the stream takes all that
    wait at once, so a stream that fell behind catches up in fewer messages."""

    def __init__(self):
        self._items: list = []
        self._ready = asyncio.Event()

    def put(self, item) -> None:
        self._items.append(item)
        self._ready.set()

    async def take(self) -> list:
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items


def _coalesce(pending: deque):
    """The next response's delta: consecutive plain deltas of one sequence that
    wait together are joined (tokens, text, logprobs; the last one's finish
    reason, usage and timings)."""
    delta = pending.popleft()
    merged = None
    while pending and not (isinstance(delta, str) or delta.error or delta.finish_reason):
        nxt = pending[0]
        if isinstance(nxt, str) or nxt.error or nxt.index != delta.index:
            break
        pending.popleft()
        if merged is None:
            merged = scheduler_pb2.SeqDelta()
            merged.CopyFrom(delta)
        merged.new_token_ids.extend(nxt.new_token_ids)
        merged.logprobs.extend(nxt.logprobs)
        merged.text += nxt.text
        if nxt.finish_reason:
            merged.finish_reason = nxt.finish_reason
            merged.usage.CopyFrom(nxt.usage)
            merged.timings.CopyFrom(nxt.timings)
            break
    return merged if merged is not None else delta


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
