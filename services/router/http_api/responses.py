"""The router's GenerateResponses -> OpenAI response objects and stream chunks."""
from __future__ import annotations

import time
from typing import Callable

from llmesh.v1 import common_pb2

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
# how a whole (non-streamed) response that ended early says so
EARLY_FINISH = {common_pb2.FINISH_REASON_DEADLINE: "deadline", common_pb2.FINISH_REASON_ABORT: "abort",
                common_pb2.FINISH_REASON_ERROR: "error"}
TokenText = Callable[[int], str]  # a token id's text, for logprobs


class Formatter:
    """One response's ids and shapes: `chat.completion(.chunk)` or `text_completion`."""

    def __init__(self, kind: str, model: str, request_id: str, logprobs: int | None,
                 token_text: TokenText):
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.logprobs = logprobs
        self.token_text = token_text
        self._text_offset: dict[int, int] = {}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- logprobs ------------------------------------------------------------
    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, index: int, logprobs) -> dict | None:
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": [
                {**self._entry(lp.token_id, lp.logprob),
                 "top_logprobs": [self._entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs)]}
                for lp in logprobs]}
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets = []
        offset = self._text_offset.get(index, 0)
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        self._text_offset[index] = offset
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.token_text(t): v for t, v in zip(lp.top_ids, lp.top_logprobs)}
                                 for lp in logprobs],
                "text_offset": offsets}

    # ---- tool calls ----------------------------------------------------------
    def _tool_call(self, call, position: int | None = None) -> dict:
        out = {"id": call.id, "type": "function",
               "function": {"name": call.name, "arguments": call.arguments}}
        return out if position is None else {"index": position, **out}

    # ---- streams -------------------------------------------------------------
    def chunk(self, index: int, text: str, logprobs, finish_reason: str | None,
              first: bool = False, tool_calls=(), num_calls_before: int = 0) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or not (finish_reason or tool_calls) else {})
            if tool_calls:  # each call whole, at its position in the message's list
                delta["tool_calls"] = [self._tool_call(c, num_calls_before + i)
                                       for i, c in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text}
            obj = "text_completion"
        choice["logprobs"] = self._logprobs(index, logprobs) if logprobs else None
        choice["finish_reason"] = finish_reason
        return {**self._head(obj), "choices": [choice]}

    def fragment(self, index: int, path: str, value) -> dict:
        """One completed JSON value of choice `index` (JSON-fragment streaming)."""
        return {**self._head("json.fragment"), "index": index, "path": path, "value": value}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    # ---- whole responses ------------------------------------------------------
    def whole(self, choices: list[tuple[int, object]], usage: dict) -> dict:
        """`choices`: (index, Choice) pairs from Complete responses."""
        out = []
        for index, c in sorted(choices, key=lambda ic: ic[0]):
            finish = FINISH.get(c.finish_reason) or EARLY_FINISH.get(c.finish_reason, "stop")
            if self.kind == "chat":
                message = {"role": "assistant", "content": c.text}
                if c.tool_calls:
                    message["content"] = c.text or None
                    message["tool_calls"] = [self._tool_call(t) for t in c.tool_calls]
                item = {"index": index, "message": message,
                        "logprobs": self._logprobs(index, c.logprobs), "finish_reason": finish}
            else:
                item = {"index": index, "text": c.text,
                        "logprobs": self._logprobs(index, c.logprobs), "finish_reason": finish}
            out.append(item)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": out, "usage": usage}


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
