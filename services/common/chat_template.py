"""Chat templates as checkpoints ship them (jinja in `tokenizer_config.json`),
rendered the way Hugging Face renders them, in a sandbox.

Templates get what Hugging Face templates expect: `messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens (`bos_token`,
`eos_token`, ...), extra keyword variables (`enable_thinking`, ...), and the
helpers `raise_exception` and `strftime_now`; `{% break %}` / `{% continue %}`
work. Undefined names are falsy, as there (a template that tests
`{% if tools %}` must not fail when a request has none).

The environment is sandboxed (no attribute access to Python internals, no
mutation of the caller's objects). A template that raises, by
`raise_exception` or by a type error on odd messages, is the request's fault:
InvalidRequestError, which maps to INVALID_ARGUMENT.
"""
from __future__ import annotations

import datetime
import json

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmesh.services.common.errors import InvalidRequestError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                      "cls_token", "mask_token")
MAX_RENDERED_CHARS = 4_000_000


class TemplateRaised(Exception):
    """What `raise_exception(message)` raises inside a template."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False):
    # as Hugging Face's: non-ASCII kept, no HTML escaping (the jinja default escapes)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant spans for
    training masks in Hugging Face): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """As Hugging Face does before rendering: keys set to None are dropped (OpenAI
    clients send `"tool_calls": null`), and reasoning under any of its names
    (`reasoning_content`, `reasoning`, `thinking`) is visible under all three."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        for key in ("reasoning_content", "reasoning", "thinking"):
            if key in m:
                for alias in ("reasoning_content", "reasoning", "thinking"):
                    m.setdefault(alias, m[key])
                break
        out.append(m)
    return out


def special_tokens_of(config: dict) -> dict[str, str]:
    """`bos_token` & co. from a tokenizer_config.json (plain strings or AddedToken dicts)."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key) or ""
        out[key] = value.get("content", "") if isinstance(value, dict) else str(value)
    return out


class ChatTemplate:
    """One compiled template; `render` is safe to call concurrently."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e}") from e
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               **extra) -> str:
        """The prompt text for `messages` (dicts with at least `role` and `content`)."""
        variables = {**self.special_tokens, **extra, "messages": normalize_messages(messages),
                     "tools": tools,
                     "documents": documents, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(**variables)
        except TemplateRaised as e:
            raise InvalidRequestError("messages", f"the chat template refused them: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise InvalidRequestError("messages", f"the chat template did something unsafe: {e}") \
                from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
                AttributeError, ArithmeticError, RecursionError, MemoryError) as e:
            raise InvalidRequestError("messages", f"the chat template failed on them: "
                                      f"{type(e).__name__}: {e}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise InvalidRequestError("messages", "the rendered prompt is too long")
        return text
