"""--budget-s of the decode benchmarks: blocks that would start after the budget is spent are
skipped and listed, so that a run under a hard time limit still ends with its JSON written."""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    def __init__(self, seconds: float | None, started: float, log: Callable[[str], None]) -> None:
        """`started`: the time.perf_counter() the budget counts from; `log` prints a line."""
        self.seconds = seconds
        self.started = started
        self.log = log
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if self.seconds is None or time.perf_counter() - self.started < self.seconds:
            return True
        self.skipped.append(what)
        self.log(f"SKIPPED (time budget of {self.seconds:.0f} s spent): {what}")
        return False
