"""A progress bar on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None = None, duration_s: float | None = None,
                 stream=None, enabled: bool = True, width: int = 24):
        self.label = label
        self.total = total
        self.duration_s = duration_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.tokens = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._interval = 0.1 if self.is_tty else 5.0

    def update(self, done: int = 1, tokens: int = 0) -> None:
        self.done += done
        self.tokens += tokens
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic(), final=True)

    def _fraction(self, elapsed: float) -> float | None:
        if self.total:
            return min(1.0, self.done / self.total)
        if self.duration_s:
            return min(1.0, elapsed / self.duration_s)
        return None

    def _draw(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        self._last_draw = now
        elapsed = now - self.start
        frac = self._fraction(elapsed)
        bar = "" if frac is None else \
            "[" + "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width)) + "] "
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        line = f"[bench] {self.label} {bar}{count} req  {elapsed:.1f}s  {rate:.0f} tok/s"
        if self.is_tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
