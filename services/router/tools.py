"""A chat request's tools in the router: checked once, constrained when a call is
required, and the model's calls read out of its replies (services/common/
tool_calls.py) for both APIs: every response of a sequence carries the content
outside calls as its `text` and each call whole in `tool_calls`, in the
response that completes it; a sequence that called tools finishes with
TOOL_CALLS."""
from __future__ import annotations

import json

from llmesh.v1 import common_pb2
from llmesh.services.common.convert import chat_from_proto
from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.tool_calls import HERMES, ToolCallParser, constraint_schema

MAX_TOOLS = 128


class ToolUse:
    def __init__(self, tools: list[dict], choice: str, parallel: bool):
        self.tools = tools
        self.choice = choice
        self.schema = constraint_schema(tools, choice, parallel)
        self.format = HERMES  # (what the tokenizer reports, once the prompt is encoded)

    @classmethod
    def of(cls, request) -> "ToolUse | None":
        """The request's tool use, checked; None when it has none to parse (no tools,
        or tool_choice "none")."""
        if request.WhichOneof("input") != "chat":
            return None
        chat = request.chat
        if not chat.tools:
            if chat.tool_choice not in ("", "auto", "none"):
                raise InvalidRequestError("tool_choice", "needs tools")
            return None
        if len(chat.tools) > MAX_TOOLS:
            raise InvalidRequestError("tools", f"at most {MAX_TOOLS} tools")
        names = [t.name for t in chat.tools]
        if not all(names) or len(set(names)) != len(names):
            raise InvalidRequestError("tools", "every tool needs a name, and names must differ")
        _, tools = chat_from_proto(chat)  # (each one's parameters parsed, or refused)
        if tools is None:  # tool_choice "none": the model does not see them
            return None
        for i, t in enumerate(tools):
            if not isinstance(t["function"]["parameters"], dict):
                raise InvalidRequestError(f"tools[{i}].parameters", "must be a JSON schema object")
        parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
        return cls(tools, chat.tool_choice or "auto", parallel)

    def constrain(self, request) -> None:
        """A required call: the reply is constrained to the call(s) as JSON."""
        if self.schema is None:
            return
        if request.sampling.HasField("structured"):
            raise InvalidRequestError("tool_choice", f"{self.choice!r} cannot be combined "
                                      "with response_format or guided decoding")
        request.sampling.structured.json_schema = json.dumps(self.schema)

    async def parse(self, responses):
        """`responses` with each sequence's calls read out of its text."""
        parsers: dict[int, ToolCallParser] = {}
        async for r in responses:
            parser = parsers.get(r.index)
            if parser is None:
                parser = parsers[r.index] = ToolCallParser(self.format, self.schema is not None)
            content, calls = parser.push(r.text)
            if r.finish_reason:
                rest, more = parser.finish()
                content, calls = content + rest, calls + more
                if parser.num_calls and r.finish_reason == common_pb2.FINISH_REASON_STOP:
                    r.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
            r.text = content
            for c in calls:
                r.tool_calls.add(id=c.id, name=c.name, arguments=c.arguments)
            yield r
