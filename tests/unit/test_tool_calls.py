"""Tool calling's core: which format a chat template writes calls in, the system
prompt for templates without tools, the schema that constrains a required call,
and reading calls out of a streamed reply (however the text is cut)."""
import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.tokenizer import TextTokenizer
from llmesh.services.common.tool_calls import (HERMES, LLAMA3_JSON, ToolCallParser,
                                               constraint_schema, tool_format_of)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}


def test_format_follows_the_template():
    assert tool_format_of((FIXTURES / "qwen2.5-7b-instruct.jinja").read_text()) == (HERMES, True)
    assert tool_format_of((FIXTURES / "llama-3.1-8b-instruct.jinja").read_text()) == \
        (LLAMA3_JSON, True)
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tool_format_of(plain) == (HERMES, False)  # described in a system message


def _run(parser, pieces):
    content, calls = [], []
    for p in pieces:
        c, k = parser.push(p)
        content.append(c)
        calls += k
    c, k = parser.finish()
    return "".join(content) + c, calls + k


REPLY = ('I will look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
         '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>')


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(REPLY)), max_size=12))
def test_hermes_calls_are_read_however_the_stream_is_cut(cuts):
    bounds = [0, *sorted(cuts), len(REPLY)]
    content, calls = _run(ToolCallParser(HERMES), [REPLY[a:b] for a, b in zip(bounds, bounds[1:])])
    assert content.strip() == "I will look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("now", {})]
    assert len({c.id for c in calls}) == 2


def test_text_that_is_not_a_call_stays_content():
    text = "a < b and <tool_call>not json</tool_call> and <tool_ca"
    assert _run(ToolCallParser(HERMES), [text[:9], text[9:30], text[30:]]) == (text, [])


def test_llama3_json_reply_and_plain_content():
    content, calls = _run(ToolCallParser(LLAMA3_JSON),
                          ["<|python", '_tag|>{"name": "now", "parameters": {}}; ',
                           '{"name": "get_weather", "parameters": {"city": "Oslo"}}'])
    assert content == "" and [c.name for c in calls] == ["now", "get_weather"]
    assert _run(ToolCallParser(LLAMA3_JSON), ["Hel", "lo {there}"]) == ("Hello {there}", [])


def test_constrained_replies_are_the_calls_as_json():
    content, calls = _run(ToolCallParser(HERMES, constrained=True),
                          ['[{"name": "now", "arg', 'uments": {}}]'])
    assert content == "" and [c.name for c in calls] == ["now"]
    # cut off by max_tokens: no call, the text is the content
    assert _run(ToolCallParser(HERMES, constrained=True), ['{"name": "no']) == ('{"name": "no', [])


def test_constraint_schemas():
    assert constraint_schema([WEATHER], "auto", True) is None
    named = constraint_schema([WEATHER, CLOCK], "get_weather", True)
    assert named["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert named["properties"]["arguments"] == WEATHER["function"]["parameters"]
    required = constraint_schema([WEATHER, CLOCK], "required", True)
    assert required["type"] == "array" and len(required["items"]["anyOf"]) == 2
    assert "anyOf" in constraint_schema([WEATHER, CLOCK], "required", False)
    with pytest.raises(InvalidRequestError):
        constraint_schema([WEATHER], "send_mail", True)


def test_a_template_without_tools_gets_them_in_a_system_message(tiny_model_dir):
    tok = TextTokenizer(tiny_model_dir)
    assert not tok._renders_tools
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = tok.tokenizer.decode(tok.apply_chat_template(messages, tools=[WEATHER]))
    assert "get_weather" in with_tools and "<tool_call>" in with_tools
    assert "Weather in Paris?" in with_tools
    without = tok.tokenizer.decode(tok.apply_chat_template(messages))
    assert "get_weather" not in without
