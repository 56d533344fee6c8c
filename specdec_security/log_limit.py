"""Logging what a caller sent without letting the caller fill the log.

`LogLimiter` allows at most `burst` lines per key and `max_bytes` bytes over all keys per
`period_s`; the first line logged after a window that left lines out says how many
(`not_logged`). `clip` shortens caller-chosen strings (source ids, request ids, method
names, error details) before they reach a log line, so a line's size is bounded whatever
the caller sent, and the byte budget is a real bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_PERIOD_S = 10.0
DEFAULT_BURST = 10  # lines per key per period
DEFAULT_MAX_BYTES = 16 * 1024  # over all keys per period
CLIP_CHARS = 64


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """`value` as text, at most `limit` characters plus a marker naming the full length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


def line_bytes(event: str, fields: dict) -> int:
    """Approximate size of a log line: the event and every field's key and value."""
    return len(event) + sum(len(k) + len(str(v)) + 2 for k, v in fields.items())


class LogLimiter:
    """Not thread-safe; each server uses one from its event loop."""

    def __init__(
        self,
        period_s: float = DEFAULT_PERIOD_S,
        burst: int = DEFAULT_BURST,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.period_s, self.burst, self.max_bytes = period_s, burst, max_bytes
        self._clock = clock
        self._start = clock()
        self._lines: dict[str, int] = {}
        self._bytes = 0
        self._not_logged: dict[str, int] = {}  # key -> lines left out, reported on its next line

    def allow(self, key: str, size: int) -> tuple[bool, int]:
        """(log it?, lines of `key` left out before it). Counts the line when allowed."""
        now = self._clock()
        if now - self._start >= self.period_s:
            self._start, self._lines, self._bytes = now, {}, 0
        lines = self._lines.get(key, 0)
        if lines >= self.burst or self._bytes + size > self.max_bytes:
            self._not_logged[key] = self._not_logged.get(key, 0) + 1
            return False, 0
        self._lines[key] = lines + 1
        self._bytes += size
        return True, self._not_logged.pop(key, 0)

    def log(self, write: Callable[..., object], event: str, key: str, **fields) -> bool:
        """write(event, **fields, not_logged=N) if the budget allows; True when written."""
        allowed, left_out = self.allow(key, line_bytes(event, fields))
        if allowed:
            if left_out:
                fields["not_logged"] = left_out
            write(event, **fields)
        return allowed
