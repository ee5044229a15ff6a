"""What a request's output must match (structured output): a JSON schema, any
JSON object, a regex or an EBNF grammar. Pure data, checked at the request's
edge: `validate()` parses the constraint with xgrammar (imported on first use;
no tokenizer needed, well under a millisecond) and raises InvalidRequestError
naming the field, so a bad schema is refused before anything is queued. The
executor compiles it for the model's vocabulary (services/executor/grammar.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmesh.services.common.errors import InvalidRequestError, UnsupportedModelError

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "ebnf")
MAX_GRAMMAR_SOURCE_CHARS = 64 * 1024
# JSON nesting of the schema document; conversion time grows ~cubically with it
# (a schema of objects nested 40 deep: ~20 ms, 200 deep: ~3 s)
MAX_SCHEMA_DEPTH = 64
_JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's errors start with "[time] /project/cpp/file.cc:123: " and maybe a failed check
_XGR_ERROR_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: .*? is false: )?")


def clean_error(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return _XGR_ERROR_PREFIX.sub("", lines[0])[:300]


@dataclass(frozen=True)
class GrammarSpec:
    """An output constraint. `source`: the JSON schema text (json_schema), the regex
    (regex), the EBNF grammar with a `root` rule (ebnf); empty for json_object (any
    JSON object)."""

    kind: str
    source: str = ""

    @property
    def field(self) -> str:
        """The request field an error names."""
        return "response_format" if self.kind.startswith("json") else "grammar"

    def validate(self, *, any_whitespace: bool = False):
        """Parse the constraint (no tokenizer needed) into an xgrammar Grammar;
        raises InvalidRequestError."""
        try:
            import xgrammar as xgr
        except ImportError:
            raise UnsupportedModelError("structured output needs the xgrammar package "
                                        "(`make install` installs it)") from None
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequestError("response_format", f"unknown constraint kind {self.kind!r}; "
                                      f"choose from {', '.join(GRAMMAR_KINDS)}")
        if len(self.source) > MAX_GRAMMAR_SOURCE_CHARS:
            raise InvalidRequestError(self.field, f"{self.kind} is longer than "
                                      f"{MAX_GRAMMAR_SOURCE_CHARS} characters")
        if self.kind == "json_object" and self.source:
            raise InvalidRequestError(self.field, "json_object takes no schema (use json_schema)")
        if self.kind == "ebnf" and not self.source.strip():
            raise InvalidRequestError(self.field, "empty EBNF grammar")
        try:
            if self.kind in ("json_object", "json_schema"):
                schema = self.source or _JSON_OBJECT_SCHEMA
                self._check_json(schema)
                # compact JSON (", " and ": "): free whitespace lets a model loop on newlines
                return xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.source)
            return xgr.Grammar.from_ebnf(self.source)
        except (RuntimeError, ValueError) as e:
            raise InvalidRequestError(self.field, f"invalid {self.kind}: {clean_error(e)}") from None

    def _check_json(self, schema: str) -> None:
        try:
            value = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(self.field, f"json_schema is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise InvalidRequestError(self.field, "json_schema must be a JSON object")
        if _json_depth(value) > MAX_SCHEMA_DEPTH:
            raise InvalidRequestError(self.field, f"json_schema nests deeper than {MAX_SCHEMA_DEPTH}")


def _json_depth(value) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [child for v in level if isinstance(v, (dict, list))
                 for child in (v.values() if isinstance(v, dict) else v)]
    return depth - 1
