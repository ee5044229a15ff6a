"""Tool calling: how a model is told about tools, how its calls are read back, and
the JSON schema that constrains them when a call is required.

Formats (how a model writes a call), chosen from its chat template:

- `hermes` (Qwen 2.5/3, Hermes, and many more: the template mentions
  `<tool_call>`): each call is `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`; text outside the tags is content.
- `llama3_json` (Llama 3.1+: the template mentions `<|python_tag|>`): the whole
  reply is one JSON object `{"name": ..., "parameters": {...}}` (after an
  optional `<|python_tag|>`); several are separated by `;`.
- a template that does not render tools at all: the tokenizer describes the
  tools in a system message (`generic_system_prompt`) that asks for the hermes
  form, and the reply is read as hermes.

With `tool_choice` "required" or a function's name, the reply is constrained
by `constraint_schema` (the structured-output machinery) to be the call itself,
as JSON: `{"name", "arguments"}`, or a list of them when parallel calls are
allowed. It is read as such (`ToolCallParser(..., constrained=True)`).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from llmesh.services.common.errors import InvalidRequestError

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def tool_format_of(template: str | None) -> tuple[str, bool]:
    """(the format a model with this chat template writes calls in, whether the
    template renders tools itself)."""
    template = template or ""
    if OPEN in template:
        return HERMES, True
    if PYTHON_TAG in template:
        return LLAMA3_JSON, True
    return HERMES, "tools" in template


def generic_system_prompt(tools: list[dict]) -> str:
    """The tools, for a model whose template cannot show them (the hermes form)."""
    lines = ["You can call functions. They are listed below as JSON. To call one, reply "
             f"with {OPEN}{{\"name\": NAME, \"arguments\": {{...}}}}{CLOSE} (one per call "
             "and nothing else); otherwise answer normally.", "Functions:"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return "\n".join(lines)


def _function_schema(tool: dict) -> dict:
    fn = tool["function"]
    return {"type": "object", "properties": {
        "name": {"type": "string", "enum": [fn["name"]]},
        "arguments": fn.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"]}


def constraint_schema(tools: list[dict], choice: str, parallel: bool) -> dict | None:
    """The JSON schema the reply must match for `choice` ("required" or a function's
    name), or None ("auto", "none")."""
    if choice in ("", "auto", "none"):
        return None
    if choice == "required":
        one = {"anyOf": [_function_schema(t) for t in tools]} if len(tools) > 1 \
            else _function_schema(tools[0])
        return {"type": "array", "items": one, "minItems": 1} if parallel else one
    named = [t for t in tools if t["function"]["name"] == choice]
    if not named:
        raise InvalidRequestError("tool_choice", f"no tool is named {choice!r}")
    return _function_schema(named[0])


@dataclass
class Call:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


def _call_of(obj, args_key: str = "arguments") -> Call | None:
    """A call from a parsed JSON value, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """One sequence's reply, as it streams: `push(text)` returns (content it is safe to
    show now, calls completed now); `finish()` returns what is left when it ends.
    A call that does not parse stays content (nothing is lost)."""

    def __init__(self, fmt: str, constrained: bool = False):
        self.fmt = fmt
        self.constrained = constrained
        self._buf = ""
        self._whole = constrained or fmt == LLAMA3_JSON  # read at the end, not streamed
        self._decided = constrained  # (llama3_json: is the reply a call or content?)
        self.num_calls = 0

    def push(self, text: str) -> tuple[str, list[Call]]:
        self._buf += text
        if self._whole:
            if self._decided:
                return "", []
            head = self._buf.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return "", []  # (nothing yet, or what could still become the tag)
            if head.startswith(("{", PYTHON_TAG)):
                self._decided = True
                return "", []
            self._whole = False  # plain content: streamed from here on
            out, self._buf = self._buf, ""
            return out, []
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[Call]]:
        if self._whole:
            text, self._buf = self._buf, ""
            calls = self._whole_calls(text)
            self.num_calls += len(calls)
            return ("", calls) if calls else (text, [])
        return self._scan(final=True)

    def _whole_calls(self, text: str) -> list[Call]:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].strip()
        if self.constrained:
            try:
                value = json.loads(body)
            except json.JSONDecodeError:
                return []
            items = value if isinstance(value, list) else [value]
            calls = [_call_of(v) for v in items]
            return calls if calls and all(calls) else []
        calls = []
        for part in body.split(";"):
            try:
                call = _call_of(json.loads(part), "parameters")
            except json.JSONDecodeError:
                return []
            if call is None:
                return []
            calls.append(call)
        return calls

    def _scan(self, final: bool) -> tuple[str, list[Call]]:
        content, calls = [], []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buf, OPEN)
                content.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            end = self._buf.find(CLOSE, start)
            if end < 0:
                content.append(self._buf[:start])
                self._buf = self._buf[start:]
                if final:  # an unclosed call: try it as it is, else it is content
                    call = self._parse_block(self._buf[len(OPEN):])
                    if call:
                        calls.append(call)
                    else:
                        content.append(self._buf)
                    self._buf = ""
                break
            content.append(self._buf[:start])
            block = self._buf[start + len(OPEN):end]
            call = self._parse_block(block)
            if call:
                calls.append(call)
            else:
                content.append(self._buf[start:end + len(CLOSE)])
            self._buf = self._buf[end + len(CLOSE):]
        self.num_calls += len(calls)
        text = "".join(content)
        if self.num_calls and not text.strip():
            text = ""  # (whitespace between calls)
        return text, calls

    @staticmethod
    def _parse_block(block: str) -> Call | None:
        try:
            return _call_of(json.loads(block))
        except json.JSONDecodeError:
            return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
