"""Sliding-window sums behind the acceptance-rate / acceptance-length gauges.

The window is a ring of one-second buckets; each bucket holds, per attribute key, the sums of
proposed drafts, accepted drafts and verify passes of the records ingested in that second.
A gauge value is a ratio of windowed *sums* (never an average of per-request ratios):

    accept_rate   = sum(accepted_drafts) / sum(proposed_drafts)             (absent if 0/0)
    accept_length = (sum(accepted_drafts) + sum(verify_passes)) / sum(verify_passes)

Time is the sidecar's monotonic clock at ingest. Thread-safe (own lock): written by the
ingest, read by metric collection (the OTLP reader thread or a Prometheus scrape).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator

_PROPOSED, _ACCEPTED, _VERIFY = 0, 1, 2


class SlidingWindow:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window must be positive")
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        # (second, {key: [proposed, accepted, verify]}), oldest first
        self._buckets: deque[tuple[int, dict[Hashable, list[int]]]] = deque()

    def add(self, key: Hashable, proposed: int, accepted: int, verify: int) -> None:
        now = int(self._clock())
        with self._lock:
            buckets = self._buckets
            if not buckets or buckets[-1][0] != now:
                buckets.append((now, {}))
                self._expire(now)
            sums = buckets[-1][1].get(key)
            if sums is None:
                buckets[-1][1][key] = [proposed, accepted, verify]
            else:
                sums[0] += proposed
                sums[1] += accepted
                sums[2] += verify

    def _expire(self, now: int) -> None:
        oldest = now - self.window_s
        buckets = self._buckets
        while buckets and buckets[0][0] <= oldest:
            buckets.popleft()

    def totals(self) -> dict[Hashable, list[int]]:
        """Per key: [proposed, accepted, verify] summed over the window."""
        now = int(self._clock())
        out: dict[Hashable, list[int]] = {}
        with self._lock:
            self._expire(now)
            for _, per_key in self._buckets:
                for key, (p, a, v) in per_key.items():
                    t = out.get(key)
                    if t is None:
                        out[key] = [p, a, v]
                    else:
                        t[0] += p
                        t[1] += a
                        t[2] += v
        return out

    def accept_rates(self) -> Iterator[tuple[Hashable, float]]:
        for key, (p, a, _) in self.totals().items():
            if p:
                yield key, a / p

    def accept_lengths(self) -> Iterator[tuple[Hashable, float]]:
        for key, (_, a, v) in self.totals().items():
            if v:
                yield key, (a + v) / v
