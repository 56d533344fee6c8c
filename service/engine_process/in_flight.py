"""InFlightCount: the requests in flight of every front end together, in shared memory, so
that back-pressure (QueueFullError, `RESOURCE_EXHAUSTED`) stays exact and synchronous when
several front-end processes submit to one engine core (`--front-ends`).

Each front end takes a place when it submits and gives it back when the request's last event
arrives (or the engine is lost). The count lives in a `multiprocessing` shared value under its
own lock, so a check and an increment are one step whichever process makes them.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


class InFlightCount:
    def __init__(self, context: Any = None) -> None:
        """`context`: the multiprocessing context whose processes share it (spawn's for the
        service's front ends); the default context's otherwise."""
        context = context or multiprocessing.get_context()
        self._value = context.Value("q", 0)  # a signed 64-bit count with its own lock

    def try_take(self, limit: int) -> bool:
        """Takes a place unless `limit` are already taken."""
        with self._value.get_lock():
            if self._value.value >= limit:
                return False
            self._value.value += 1
            return True

    def give_back(self, places: int = 1) -> None:
        if places:
            with self._value.get_lock():
                self._value.value -= places

    @property
    def count(self) -> int:
        return self._value.value
