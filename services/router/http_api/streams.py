"""The router calls of one HTTP request, and its SSE event stream.

One prompt is read straight from its call (DirectUpstream); a completions
request with several prompts makes one router call each, merged into one queue
(Upstream; choice index = prompt * n + sequence). SseStream turns the deltas
into events: each as soon as it arrives, an error event (with `incomplete` and
why) if the stream breaks, then `data: [DONE]`. SseResponse sends them, with a
comment heartbeat whenever nothing was sent for a while.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from llmesh.services.common.errors import LlmeshError
from llmesh.services.router.generation import Call
from llmesh.services.router.http_api.errors import ApiError, from_error
from llmesh.services.router.http_api.json_fragments import JsonFragments
from llmesh.services.router.http_api.responses import FINISH, Formatter, usage_dict

log = logging.getLogger("llmesh.router.http")
_END = object()
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _failure(e: Exception) -> ApiError:
    """What ended a router call early, as the stream's error event."""
    if isinstance(e, LlmeshError):
        return from_error(e)
    return ApiError(502, f"router stream failed: {e!r}", "server_error")


class Upstream:
    """The router streams of one request, read into one queue."""

    def __init__(self, generation, requests: list, call: Call):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.calls = [generation.generate(req, call) for req in requests]
        self.num_open = len(self.calls)
        self._tasks = [asyncio.ensure_future(self._pump(i, call))
                       for i, call in enumerate(self.calls)]

    async def _pump(self, i: int, call) -> None:
        try:
            async for response in call:
                self.queue.put_nowait((i, response))
            self.queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (a broken call is an error event, not a crash)
            self.queue.put_nowait((i, _failure(e)))

    async def next(self, timeout_s: float):
        """The next (prompt index, response | _END | ApiError), or None after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self.queue.get()
        except TimeoutError:
            return None

    def cancel(self) -> None:
        for task in self._tasks:  # (a stream cancelled in its read runs its cleanup)
            task.cancel()


class DirectUpstream:
    """One router stream read in the response's own task: no pump task and no
    queue hop per event (the common case: one prompt)."""

    def __init__(self, generation, request, call: Call):
        self._it = generation.generate(request, call)
        self.num_open = 1
        self._pending: asyncio.Future | None = None  # a read that outlived a timed wait

    async def _read(self):
        try:
            return 0, await self._it.__anext__()
        except StopAsyncIteration:
            return 0, _END
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (a broken call is an error event, not a crash)
            return 0, _failure(e)

    async def next(self, timeout_s: float | None = None):
        """As Upstream.next; without a timeout the read happens in the caller's task."""
        if self._pending is None:
            if timeout_s is None:
                return await self._read()
            self._pending = asyncio.ensure_future(self._read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            return None
        task, self._pending = self._pending, None
        return task.result()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        # the stream's cleanup (cancel upstream, settle) runs now, not when collected
        asyncio.ensure_future(self._it.aclose()).add_done_callback(
            lambda f: f.cancelled() or f.exception())


class SseResponse:
    """An ASGI response for an SSE byte stream: each chunk is sent as soon as the
    iterator yields it; a comment heartbeat goes out whenever nothing was sent for
    `heartbeat_s`; a client disconnect cancels the iterator (its cleanup cancels
    the request)."""

    def __init__(self, body_iterator, heartbeat_s: float, headers: dict[str, str]):
        self.body_iterator = body_iterator
        self.heartbeat_s = heartbeat_s
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        lock = asyncio.Lock()  # heartbeats never split an event
        last = [time.monotonic()]

        async def body() -> None:
            async for chunk in self.body_iterator:
                async with lock:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last[0] = time.monotonic()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def heartbeats() -> None:
            while True:
                await asyncio.sleep(max(0.0, last[0] + self.heartbeat_s - time.monotonic()))
                if time.monotonic() - last[0] >= self.heartbeat_s:
                    async with lock:
                        await send({"type": "http.response.body", "body": HEARTBEAT,
                                    "more_body": True})
                    last[0] = time.monotonic()

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
        sending = asyncio.ensure_future(body())
        others = [asyncio.ensure_future(heartbeats()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait([sending, others[1]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [sending] + others:
                task.cancel()
            await asyncio.gather(sending, *others, return_exceptions=True)
        for task in others:  # (a broken heartbeat must not pass silently)
            if not task.cancelled() and task.exception() is not None:
                log.error("SSE heartbeat task failed: %r", task.exception())
        if sending.done() and not sending.cancelled() and sending.exception() is not None:
            raise sending.exception()


class SseStream:
    """Turns an Upstream into SSE bytes; `first` is an item already taken from it."""

    def __init__(self, upstream, fmt: Formatter, n: int, include_usage: bool,
                 first=None, on_end=None, include_timing: bool = False,
                 json_fragments: bool = False):
        self.upstream = upstream
        self.fmt = fmt
        self.n = n
        self.include_usage = include_usage
        self.first = first
        self.on_end = on_end  # called with the outcome ("ok" or an error type)
        self.include_timing = include_timing  # each event: the scheduler's emitted_unix_s
        # per choice: its JSON cut into completed values, sent instead of text deltas
        self.fragments: dict[int, JsonFragments] | None = {} if json_fragments else None

    async def __aiter__(self):
        outcome = "cancelled"
        started: set[int] = set()
        num_calls: dict[int, int] = {}  # per choice: tool calls sent so far
        usage = [0, 0, 0]  # prompt, completion, cached
        counted_prompts: set[int] = set()
        incomplete = ""
        item, self.first = self.first, None
        try:
            while True:
                if item is None:
                    item = await self.upstream.next(None)
                prompt, resp = item
                item = None
                if resp is _END:
                    self.upstream.num_open -= 1
                    if self.upstream.num_open:
                        continue
                    break
                if isinstance(resp, ApiError):
                    outcome = resp.type
                    body = resp.body()
                    body["error"]["incomplete"] = True
                    body["error"]["incomplete_reason"] = incomplete or resp.message
                    yield event({"id": self.fmt.id, "choices": [], **body})
                    yield DONE
                    return
                if resp.incomplete:
                    incomplete = resp.incomplete_reason
                index = prompt * self.n + resp.index
                reason = FINISH.get(resp.finish_reason)
                if resp.finish_reason and reason is None:  # deadline / abort / error: the
                    if resp.text or resp.token_ids:         # router's error follows
                        yield event(self.fmt.chunk(index, resp.text, resp.logprobs, None,
                                                   first=index not in started))
                        started.add(index)
                    continue
                text = resp.text
                if self.fragments is not None:
                    parser = self.fragments.setdefault(index, JsonFragments())
                    done = parser.feed(text) + (parser.finish() if resp.finish_reason else [])
                    for path, value in done:
                        yield event(self.fmt.fragment(index, path, value))
                    text = ""
                    if not resp.finish_reason:
                        continue
                if text or resp.finish_reason or index not in started or resp.logprobs \
                        or resp.tool_calls:
                    chunk = self.fmt.chunk(index, text, resp.logprobs, reason,
                                           first=index not in started, tool_calls=resp.tool_calls,
                                           num_calls_before=num_calls.get(index, 0))
                    num_calls[index] = num_calls.get(index, 0) + len(resp.tool_calls)
                    if self.include_timing:
                        chunk["emitted_unix_s"] = resp.emitted_unix_s
                    yield event(chunk)
                    started.add(index)
                if resp.finish_reason:
                    usage[1] += resp.usage.completion_tokens
                    if prompt not in counted_prompts:
                        counted_prompts.add(prompt)
                        usage[0] += resp.usage.prompt_tokens
                        usage[2] += resp.usage.cached_prompt_tokens
            if self.include_usage:
                yield event(self.fmt.usage_chunk(usage_dict(*usage)))
            yield DONE
            outcome = "ok"
        finally:
            self.upstream.cancel()
            if self.on_end is not None:
                self.on_end(outcome)

