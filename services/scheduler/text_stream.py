"""Text of a sequence as its tokens are produced: incremental detokenization and
stop strings, in the scheduler, so a sequence that hits a stop string finishes
in the step that produced it and the text leaves the replica with its tokens."""
from __future__ import annotations

from llmesh.services.common.tokenizer import IncrementalDetokenizer, TextTokenizer


class StopMatcher:
    """Finds stop strings in streamed text. Holds back a tail that could still
    become a stop string, so text after a stop is never emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.is_stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.is_stopped = True
            self._held = ""
            return buf[:min(hits)]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TextStream:
    """One sequence's output text. `push` returns the text its new tokens add
    (what is safe to show: never half a character, never a possible stop string);
    `finish` returns whatever was held back when the sequence ends otherwise."""

    def __init__(self, tokenizer: TextTokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self._detok = IncrementalDetokenizer(tokenizer)
        self._matcher = StopMatcher(stops)

    @property
    def is_stopped(self) -> bool:
        return self._matcher.is_stopped

    def fresh(self) -> "TextStream":
        """A stream for a fork of this sequence (forks happen before any output)."""
        return TextStream(self.tokenizer, self.stops)

    def push(self, token_ids: list[int]) -> str:
        if self._matcher.is_stopped:
            return ""
        return self._matcher.push(self._detok.push(token_ids))

    def finish(self) -> str:
        if self._matcher.is_stopped:
            return ""
        return self._matcher.push(self._detok.flush()) + self._matcher.flush()
