"""Tokenizer core over a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`).

Encode / decode, chat templates (jinja, as the checkpoint ships them) and
incremental detokenization that never emits a broken UTF-8 sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from llmesh.services.common.chat_template import ChatTemplate, special_tokens_of
from llmesh.services.common.errors import InvalidRequestError, UnsupportedModelError
from llmesh.services.common.tool_calls import generic_system_prompt, tool_format_of


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.model_dir = model_dir
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._template = None
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if not template and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        if template:
            self._template = ChatTemplate(template, special_tokens_of(self.config))
        # how this model writes tool calls, and whether its template shows it tools
        self.tool_format, self._renders_tools = tool_format_of(template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Render the chat template to text, then encode it (no extra BOS). `tools`
        (OpenAI's `tools`: {"type": "function", "function": {...}}) go to the template,
        or, when it does not show tools, into a system message that describes them
        (services/common/tool_calls.py)."""
        if self._template is None:
            raise InvalidRequestError("messages", "this model has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}]", "needs string 'role' and 'content'")
        if tools and not self._renders_tools:
            prompt = generic_system_prompt(tools)
            if messages and messages[0]["role"] == "system":
                messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt},
                            *messages[1:]]
            else:
                messages = [{"role": "system", "content": prompt}, *messages]
            tools = None
        text = self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools or None)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each token goes through the tokenizers library's own incremental decoder
    (`DecodeStream`, which keeps the context that leading-space and byte-level
    merges need), so a token costs one call, not a re-decode of a window. Text
    that ends in an incomplete UTF-8 character is held back, so every delta is
    valid text; the deltas and `flush` join to `decode(ids)`.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._num_chars = 0  # characters emitted so far

    def push(self, new_ids: list[int]) -> str:
        pieces = []
        for token_id in new_ids:
            self.token_ids.append(token_id)
            piece = self._stream.step(self.tokenizer.tokenizer, token_id)
            if piece:
                pieces.append(piece)
        text = "".join(pieces)
        self._num_chars += len(text)
        return text

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (replacement chars included)."""
        full = self.tokenizer.decode(self.token_ids, self.skip_special_tokens)
        tail = full[self._num_chars:]
        self._num_chars = len(full)
        return tail
