"""OpenAI's tool-calling fields of a chat request -> ChatMessages: `tools`,
`tool_choice`, `parallel_tool_calls`, an assistant message's `tool_calls` and a
tool message's `tool_call_id` / `name` (checked here; the router's
services/router/tools.py checks what both APIs share)."""
from __future__ import annotations

import json

from llmesh.services.router.http_api.errors import invalid
from llmesh.services.router.http_api.fields import _MISSING, _bool, _get, _text


def message_tools(i: int, m: dict, msg) -> None:
    """An assistant message's `tool_calls`; a tool message's `tool_call_id` and `name`."""
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise invalid(f"messages[{i}].tool_calls", "is a list, on assistant messages")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise invalid(f"messages[{i}].tool_calls[{j}]",
                              'must be {"id", "type": "function", "function": {"name", "arguments"}}')
            args = fn.get("arguments", "")
            args = json.dumps(args) if isinstance(args, dict) else _text(
                f"messages[{i}].tool_calls[{j}].function.arguments", args)
            msg.tool_calls.add(id=_text(f"messages[{i}].tool_calls[{j}].id", c.get("id", "")),
                               name=fn["name"], arguments=args)
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None:
            setattr(msg, key, _text(f"messages[{i}].{key}", m[key]))


TOOL_CHOICES = ("none", "auto", "required")


def tools_of(body: dict, chat) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` (OpenAI's shapes)."""
    tools = _get(body, "tools")
    if tools is not _MISSING:
        if not isinstance(tools, list):
            raise invalid("tools", "must be a list")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == \
                "function" else None
            if not isinstance(fn, dict):
                raise invalid(f"tools[{i}]", 'must be {"type": "function", "function": {...}}')
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise invalid(f"tools[{i}].function.name", "must be a non-empty string")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise invalid(f"tools[{i}].function.parameters", "must be a JSON schema object")
            chat.tools.add(name=name, description=_text(f"tools[{i}].function.description",
                                                        fn.get("description") or ""),
                           parameters=json.dumps(params) if params is not None else "")
    choice = _get(body, "tool_choice")
    if choice is not _MISSING:
        if isinstance(choice, str) and choice in TOOL_CHOICES:
            chat.tool_choice = choice
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
                and isinstance(choice["function"].get("name"), str):
            chat.tool_choice = choice["function"]["name"]
        else:
            raise invalid("tool_choice", 'must be "none", "auto", "required" or {"type": '
                          '"function", "function": {"name": NAME}}')
    if _get(body, "parallel_tool_calls") is not _MISSING:
        chat.parallel_tool_calls = _bool(body, "parallel_tool_calls")
