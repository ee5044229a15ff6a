"""OpenAI request bodies -> the router's GenerateRequest, checked once, here.

Every field is type- and range-checked with an error that names it (HTTP 400).
Unknown fields are ignored, as OpenAI-compatible servers do. Defaults follow
OpenAI: temperature 1, top_p 1; chat generates up to the end of the context
unless `max_tokens` / `max_completion_tokens` says otherwise, completions 16.

Extensions (not in OpenAI's API): every other sampling parameter llmesh declares
(services/common/sampling_params.py: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, `repetition_max_ngram`, ...), `priority` (interactive | standard | batch; the
`x-llmesh-priority` header does the same) and `timeout_ms`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from llmesh.v1 import common_pb2, inference_pb2
from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.sampling_params import PARAMS, RANGES
from llmesh.services.router.http_api.errors import ApiError, invalid
from llmesh.services.router.http_api.fields import _MISSING, _bool, _get, _int, _number, _text
from llmesh.services.router.http_api.tool_requests import message_tools, tools_of

PRIORITIES = {"interactive": common_pb2.PRIORITY_INTERACTIVE,
              "standard": common_pb2.PRIORITY_STANDARD, "batch": common_pb2.PRIORITY_BATCH}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_PROMPTS = 64


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    model: str
    requests: list  # one GenerateRequest per prompt (chat: one)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None = off; k = top-k alternatives
    include_timing: bool = False  # stream chunks carry the scheduler's emitted_unix_s
    json_fragments: bool = False  # stream completed JSON values, not text deltas


def _ranged(body: dict, name: str, key: str | None = None):
    """Body field `key` (default: `name`), checked against the range the sampling
    parameter `name` declares (the same values the gRPC API accepts)."""
    key = key or name
    bounds = RANGES[name]
    value = _int(body, key, -2**63, 2**64) if bounds.is_int else \
        _number(body, key, -math.inf, math.inf)
    if value is not None:
        try:
            bounds.check(key, value)
        except InvalidRequestError as e:
            raise invalid(key, e.message) from None
    return value


def _unsupported(body: dict, name: str, allowed=()) -> None:
    value = _get(body, name)
    if value is not _MISSING and value not in allowed and value not in ([], {}):
        raise ApiError(400, f"{name}: not supported by this server", param=name,
                       code="unsupported_parameter")


# the parameters whose HTTP shape is not their declared one (the rest are read
# field for field: a number in its declared range, or a boolean)
_OWN_SHAPE = {"max_tokens", "temperature", "top_k", "seed", "stop", "stop_token_ids",
              "logprobs"}


def _sampling(body: dict, max_tokens_default: int | None) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams()
    max_tokens = _ranged(body, "max_tokens", "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _ranged(body, "max_tokens")
    s.max_tokens = max_tokens if max_tokens is not None else (max_tokens_default or 0)
    temperature = _ranged(body, "temperature")
    s.temperature = 1.0 if temperature is None else temperature  # (OpenAI's default)
    top_k = _int(body, "top_k", -1, int(RANGES["top_k"].hi))  # (-1, as 0: off)
    if top_k is not None and top_k > 0:  # -1 and 0: off
        s.top_k = top_k
    seed = _int(body, "seed", -2**63, 2**64 - 1)
    if seed is not None:
        s.seed = seed % 2**63  # OpenAI seeds are any int64
    stop = _get(body, "stop")
    if stop is not _MISSING:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list):
            raise invalid("stop", "must be a string or a list of strings")
        s.stop.extend(_text("stop", x) for x in stops)
    ids = _get(body, "stop_token_ids")
    if ids is not _MISSING:
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in ids):
            raise invalid("stop_token_ids", "must be a list of token ids")
        s.stop_token_ids.extend(ids)
    for name, f in PARAMS.items():
        key = f.metadata["http"]
        if name in _OWN_SHAPE or key is None:
            continue
        key = key or name
        value = _ranged(body, name, key) if name in RANGES else \
            (_bool(body, key) if _get(body, key) is not _MISSING else None)
        if value is not None:
            setattr(s, name, value)
    best_of = _ranged(body, "n", "best_of")
    if best_of is not None and best_of != (s.n or 1):
        raise ApiError(400, "best_of: only best_of == n is supported", param="best_of",
                       code="unsupported_parameter")
    return s


def _common(body: dict, headers, req: inference_pb2.GenerateRequest) -> tuple[bool, bool, bool]:
    """Fields both endpoints share; returns (stream, include_usage, include_timing)
    (`stream_options.json_fragments` is read by `_fragments`)."""
    model = _get(body, "model")
    req.model = "" if model is _MISSING else _text("model", model)
    priority = _get(body, "priority")
    if priority is _MISSING:
        priority = headers.get("x-llmesh-priority", _MISSING)
    if priority is not _MISSING:
        if not isinstance(priority, str) or priority not in PRIORITIES:
            raise invalid("priority", f"must be one of {', '.join(PRIORITIES)}")
        req.priority = PRIORITIES[priority]
    timeout_ms = _int(body, "timeout_ms", 1, 2**32 - 1)
    if timeout_ms is not None:
        req.timeout_ms = timeout_ms
    user = _get(body, "user")
    if user is not _MISSING:
        _text("user", user)
    for name in ("logit_bias", "suffix"):
        _unsupported(body, name)
    stream = _bool(body, "stream")
    options = _get(body, "stream_options")
    include_usage = include_timing = False
    if options is not _MISSING:
        if not isinstance(options, dict):
            raise invalid("stream_options", "must be an object")
        include_usage = _bool(options, "include_usage")
        include_timing = _bool(options, "include_timing")
    return stream, include_usage, include_timing


def _response_format(body: dict, req: inference_pb2.GenerateRequest) -> None:
    """`{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}` -> the request's structured output."""
    fmt = _get(body, "response_format")
    if fmt is _MISSING:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("response_format", "type must be text, json_object or json_schema")
    if fmt["type"] == "json_object":
        req.sampling.structured.json_object = True
    elif fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise invalid("response_format", "json_schema.schema must be a JSON schema object")
        req.sampling.structured.json_schema = json.dumps(schema)


GUIDED = ("guided_json", "guided_regex", "guided_grammar", "guided_choice")


def _guided(body: dict, req: inference_pb2.GenerateRequest) -> None:
    """vLLM's structured-output extensions, so clients written for it work as they
    are: `guided_json` (a schema, object or text), `guided_regex`, `guided_grammar`
    (EBNF, xgrammar's dialect), `guided_choice` (one of a list of strings)."""
    given = [name for name in GUIDED if _get(body, name) is not _MISSING]
    if not given:
        return
    if len(given) > 1 or req.sampling.HasField("structured"):
        raise invalid(given[-1], "only one of response_format and the guided_* fields")
    name, value = given[0], body[given[0]]
    s = req.sampling.structured
    if name == "guided_json":
        if isinstance(value, str):
            s.json_schema = _text(name, value)
        elif isinstance(value, (dict, bool)):
            s.json_schema = json.dumps(value)
        else:
            raise invalid(name, "must be a JSON schema (an object or its text)")
    elif name == "guided_choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(c, str) and c for c in value):
            raise invalid(name, "must be a non-empty list of non-empty strings")
        s.regex = "|".join(_regex_literal(_text(name, c)) for c in value)
    else:
        setattr(s, "regex" if name == "guided_regex" else "ebnf", _text(name, value))


def _regex_literal(text: str) -> str:
    """`text` matched literally (only the metacharacters escaped: xgrammar's regex
    dialect refuses escapes of ordinary characters)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


_REGEX_META = frozenset("\\.^$*+?()[]{}|")


def _fragments(body: dict, req: inference_pb2.GenerateRequest, stream: bool) -> bool:
    """`stream_options.json_fragments`: needs a stream and a JSON response_format."""
    options = _get(body, "stream_options")
    if not isinstance(options, dict) or not _bool(options, "json_fragments"):
        return False
    kind = req.sampling.structured.WhichOneof("kind")
    if not stream or kind not in ("json_object", "json_schema"):
        raise invalid("stream_options", "json_fragments needs stream: true and a JSON "
                      "response_format")
    return True


def _content(i: int, content) -> str:
    if isinstance(content, str):
        return _text(f"messages[{i}].content", content)
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               param=f"messages[{i}].content", code="unsupported_content")
            texts.append(_text(f"messages[{i}].content[{j}].text", part.get("text")))
        return "".join(texts)
    raise invalid(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body, headers) -> ParsedRequest:
    if not isinstance(body, dict):
        raise invalid("", "the body must be a JSON object")
    messages = _get(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list")
    _unsupported(body, "functions")
    req = inference_pb2.GenerateRequest()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}")
        content = m.get("content")
        text = "" if content is None and role == "assistant" else _content(i, content)
        msg = req.chat.messages.add(role="system" if role == "developer" else role, content=text)
        message_tools(i, m, msg)
    tools_of(body, req.chat)
    stream, include_usage, include_timing = _common(body, headers, req)
    req.sampling.CopyFrom(_sampling(body, None))
    _response_format(body, req)
    _guided(body, req)
    fragments = _fragments(body, req, stream)
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _ranged(body, "logprobs", "top_logprobs") or 0
    elif _get(body, "top_logprobs") not in (_MISSING, 0):
        raise invalid("top_logprobs", "needs logprobs: true")
    if logprobs is not None:
        req.sampling.logprobs = logprobs
    return ParsedRequest("chat", req.model, [req], req.sampling.n or 1, stream, include_usage,
                         logprobs, include_timing, fragments)


def _prompts(prompt) -> list:
    """A completion prompt: text, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [_text("prompt", prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if len(prompt) > MAX_PROMPTS:
            raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(_text("prompt", p))
            elif isinstance(p, list) and p and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in p):
                out.append(p)
            else:
                raise invalid("prompt", "must be a string, a list of strings, or token ids")
        return out
    raise invalid("prompt", "must be a non-empty string, list of strings, or token ids")


def parse_completion(body, headers) -> ParsedRequest:
    if not isinstance(body, dict):
        raise invalid("", "the body must be a JSON object")
    prompt = _get(body, "prompt")
    if prompt is _MISSING:
        raise invalid("prompt", "is required")
    if _bool(body, "echo"):
        raise ApiError(400, "echo: not supported by this server", param="echo",
                       code="unsupported_parameter")
    base = inference_pb2.GenerateRequest()
    stream, include_usage, include_timing = _common(body, headers, base)
    base.sampling.CopyFrom(_sampling(body, 16))
    _response_format(body, base)
    _guided(body, base)
    fragments = _fragments(body, base, stream)
    logprobs = _ranged(body, "logprobs")
    if logprobs is not None:
        base.sampling.logprobs = logprobs
    requests = []
    for p in _prompts(prompt):
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(base)
        if isinstance(p, str):
            req.prompt = p
        else:
            if not all(0 <= t < 2**63 for t in p):
                raise invalid("prompt", "token ids must be non-negative")
            req.token_ids.ids.extend(p)
        requests.append(req)
    return ParsedRequest("completion", base.model, requests, base.sampling.n or 1, stream,
                         include_usage, logprobs, include_timing, fragments)
