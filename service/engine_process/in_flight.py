"""InFlightCount: the requests in flight of every front end together, so that back-pressure
(QueueFullError, `RESOURCE_EXHAUSTED`) stays exact and synchronous when several front-end
processes submit to one engine core (`--front-ends`).

Each front end takes a place when it submits and gives it back when the request's last event
arrives (or the engine is lost). With several front ends the count lives in a `multiprocessing`
shared value under its own lock, so a check and an increment are one step whichever process
makes them; with one, in this process under a thread lock. A front end killed while it holds
the shared lock would leave it held forever: every wait for it is bounded (LOCK_TIMEOUT_S), and
a front end that cannot take it refuses the request rather than block its event loop (the dead
front end's pipe has ended the core by then, and the service is stopping).
"""

from __future__ import annotations

import threading
from typing import Any

LOCK_TIMEOUT_S = 1.0


class InFlightCountUnavailable(RuntimeError):
    """The shared count's lock was not free within LOCK_TIMEOUT_S."""


class InFlightCount:
    def __init__(self, context: Any = None) -> None:
        """`context`: the multiprocessing context whose processes share the count (spawn's for
        the service's front ends); None: a count for this process alone."""
        if context is None:
            self._lock: Any = threading.Lock()
            self._local = 0
            self._shared = None
        else:
            self._shared = context.Value("q", 0)  # a signed 64-bit count with its own lock
            self._lock = self._shared.get_lock()

    def try_take(self, limit: int) -> bool:
        """Takes a place unless `limit` are already taken; raises InFlightCountUnavailable if the
        lock stays held (by a front end that died holding it)."""
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise InFlightCountUnavailable(
                "the shared in-flight count is held by a front end that did not let go"
            )
        try:
            if self._read() >= limit:
                return False
            self._add(1)
            return True
        finally:
            self._lock.release()

    def give_back(self, places: int = 1) -> bool:
        """Gives `places` back; False (and nothing given) if the lock stays held."""
        if not places:
            return True
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            return False
        try:
            self._add(-places)
            return True
        finally:
            self._lock.release()

    @property
    def count(self) -> int:
        return self._read()

    def _read(self) -> int:
        return self._local if self._shared is None else self._shared.value

    def _add(self, places: int) -> None:
        if self._shared is None:
            self._local += places
        else:
            self._shared.value += places
