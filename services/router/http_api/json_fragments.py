"""JSON-fragment streaming: a JSON text arriving in pieces, cut into its
completed values as soon as each is whole (docs/http-api.md).

What is emitted, by path (JSONPath-like, `$` is the whole value):
- each member of the top-level object, `$.name` (keys that are not plain
  identifiers: `$["a key"]`), once its value is complete;
- a member whose value is an array is emitted element by element instead,
  `$.name[0]`, `$.name[1]`, ... (a long list streams as it grows);
- each element of a top-level array, `$[0]`, `$[1]`, ...;
- a top-level scalar, `$`.
Each value is handed over as parsed JSON, so every event stands alone.
"""
from __future__ import annotations

import json
import re

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def member_path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if _IDENT.match(key) else f"{parent}[{json.dumps(key)}]"


class _Frame:
    __slots__ = ("kind", "path", "emit", "key", "count", "start", "expect_key")

    def __init__(self, kind: str, path: str, emit: bool):
        self.kind = kind  # "obj" | "arr"
        self.path = path
        self.emit = emit  # whether this container's direct children are emitted
        self.key = None  # obj: the member being read
        self.count = 0  # arr: elements so far
        self.start = -1  # offset where the current child value started (-1: none yet)
        self.expect_key = True


class JsonFragments:
    """Feed text with `feed`; each call returns the (path, value) pairs completed by it."""

    def __init__(self):
        self.text = ""
        self._pos = 0
        self._stack: list[_Frame] = []
        self._in_string = False
        self._escape = False
        self._string_start = -1
        self._top_start = -1
        self._done = False

    def feed(self, chunk: str) -> list[tuple[str, object]]:
        self.text += chunk
        out: list[tuple[str, object]] = []
        text = self.text
        while self._pos < len(text):
            i = self._pos
            c = text[i]
            self._pos += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    self._string_done(i, out)
                continue
            if c in " \t\r\n":
                self._scalar_maybe_done(i, out)
                continue
            if c == '"':
                self._value_starts(i)
                self._in_string = True
                self._string_start = i
            elif c in "{[":
                self._value_starts(i)
                parent = self._stack[-1] if self._stack else None
                if parent is None:
                    path, emit = "$", True
                else:
                    path = self._child_path(parent)
                    # a top-level member holding an array: its elements are emitted
                    emit = c == "[" and parent.kind == "obj" and len(self._stack) == 1
                self._stack.append(_Frame("obj" if c == "{" else "arr", path, emit))
            elif c in "}]":
                self._scalar_maybe_done(i, out)
                frame = self._stack.pop()
                self._container_done(frame, i, out)
            elif c == ",":
                self._scalar_maybe_done(i, out)
                frame = self._stack[-1]
                frame.start = -1
                if frame.kind == "obj":
                    frame.expect_key = True
            elif c == ":":
                self._stack[-1].expect_key = False
            else:  # a scalar's character (number, true, false, null)
                self._value_starts(i)
        self._scalar_maybe_done(len(text), out, at_end=True)
        return out

    def finish(self) -> list[tuple[str, object]]:
        """The end of the text: a top-level number / literal still open is complete."""
        if not self._stack and self._top_start >= 0 and not self._done \
                and self.text[self._top_start] not in '"{[':
            out: list[tuple[str, object]] = []
            self._emit("$", self._top_start, len(self.text.rstrip()) - 1, out)
            return out
        return []

    # ---- values ----------------------------------------------------------------
    def _value_starts(self, i: int) -> None:
        if not self._stack:
            if self._top_start < 0:
                self._top_start = i
            return
        frame = self._stack[-1]
        if frame.kind == "obj" and frame.expect_key:
            return  # a key, not a value
        if frame.start < 0:
            frame.start = i

    def _child_path(self, frame: _Frame) -> str:
        if frame.kind == "obj":
            return member_path(frame.path, frame.key)
        return f"{frame.path}[{frame.count}]"

    def _string_done(self, end: int, out: list) -> None:
        if not self._stack:
            self._emit("$", self._top_start, end, out)
            return
        frame = self._stack[-1]
        if frame.kind == "obj" and frame.expect_key:
            frame.key = json.loads(self.text[self._string_start:end + 1])
            return
        self._child_done(frame, end, out)

    def _scalar_maybe_done(self, i: int, out: list, at_end: bool = False) -> None:
        """A number / true / false / null ends at a delimiter (not at the end of
        the text so far: more digits may come)."""
        if at_end:
            return
        if not self._stack:
            if self._top_start >= 0 and not self._done and self.text[self._top_start] not in '"{[':
                self._emit("$", self._top_start, i - 1, out)
            return
        frame = self._stack[-1]
        if frame.start >= 0 and self.text[frame.start] not in '"{[' and not \
                (frame.kind == "obj" and frame.expect_key):
            self._child_done(frame, i - 1, out)

    def _container_done(self, frame: _Frame, end: int, out: list) -> None:
        if not self._stack:
            if self._top_start >= 0 and not frame.emit:
                self._emit("$", self._top_start, end, out)
            self._done = True
            return
        parent = self._stack[-1]
        if frame.emit and frame.kind == "arr" and parent.kind == "obj":
            if frame.count == 0:  # an empty list: say so once
                self._emit(frame.path, parent.start, end, out)
            parent.start = -1  # streamed element by element: not again as a whole
            return
        self._child_done(parent, end, out)

    def _child_done(self, frame: _Frame, end: int, out: list) -> None:
        if frame.start < 0:
            return
        if frame.emit:
            self._emit(self._child_path(frame), frame.start, end, out)
        frame.start = -1
        if frame.kind == "arr":
            frame.count += 1

    def _emit(self, path: str, start: int, end: int, out: list) -> None:
        out.append((path, json.loads(self.text[start:end + 1])))
        if path == "$":
            self._done = True
