"""Per-source sequence watermarks: duplicate detection and acknowledgement state.

A source (one reporter process: instance id + per-start nonce) numbers its records 1, 2, 3, ...
and sends them in increasing order; after a reconnect it resends, in order, everything that was
not acknowledged. So one integer per source is an exact duplicate filter: a record whose
sequence is <= the highest sequence already processed from that source has been seen
(gaps are records the source dropped from its full buffer and never sent).

`processed` advances as batches are processed (counted, duplicate or rejected); `durable`
advances when an export that included them succeeded (OTLP mode) and is what the sidecar
acknowledges in that mode.

The table is bounded three ways: a source silent for `idle_s` is forgotten (every restart of
a service is a new source, so sources of stopped processes leave); beyond `max_sources`
entries or `max_bytes` of approximate memory (source ids are chosen by the reporter and may be
long), the least recently active are forgotten first. A forgotten source that comes back is
treated as new, so records it resends then are counted again: that is the double-count
window docs/metrics.md ("Delivery semantics") documents, and every eviction is counted
(`on_evict(cause)`, cause in EVICTION_CAUSES).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_SOURCES = 100_000
DEFAULT_MAX_SOURCE_BYTES = 64 << 20
DEFAULT_SOURCE_IDLE_S = 3600.0
# How far a known source's sequence may run ahead of its watermark beyond the records it
# declares dropped (the ingest's sequence_jump check): slack for records of the source that
# another sidecar processed meanwhile (reporters behind a load balancer).
DEFAULT_MAX_SEQUENCE_JUMP = 1_000_000
# Approximate memory of one entry besides its id: the state object, the dict slot, the str header.
ENTRY_OVERHEAD_BYTES = 200
EVICTION_CAUSES = ("idle", "count", "bytes")


class SourceState:
    __slots__ = ("source_id", "processed", "durable", "last_seen", "size", "series")

    def __init__(self, source_id: str, now: float) -> None:
        self.source_id = source_id
        self.processed = 0  # highest sequence processed (counted, duplicate or rejected)
        self.durable = 0  # highest sequence included in a successful export
        self.last_seen = now  # clock() when a batch of this source was last processed
        self.size = len(source_id.encode("utf-8", "surrogatepass")) + ENTRY_OVERHEAD_BYTES
        self.series = 0  # series this source added to the label budget (series_budget.py)


class SourceTable:
    """Not thread-safe: owned by the ingest event loop (snapshots are taken under the
    aggregation lock, which the ingest also holds while it advances `processed`)."""

    def __init__(
        self,
        max_sources: int = DEFAULT_MAX_SOURCES,
        max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
        idle_s: float = DEFAULT_SOURCE_IDLE_S,
        on_evict: Callable[[str], None] = lambda cause: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sources: OrderedDict[str, SourceState] = OrderedDict()  # least recently active first
        self._max = max_sources
        self._max_bytes = max_bytes
        self._idle_s = idle_s
        self._on_evict = on_evict
        self._clock = clock
        self._bytes = 0

    def get(self, source_id: str) -> SourceState:
        """The state of `source_id`, which is active now (created if unknown or forgotten)."""
        now = self._clock()
        self._forget_idle(now)
        state = self._sources.get(source_id)
        if state is None:
            state = SourceState(source_id, now)
            self._sources[source_id] = state
            self._bytes += state.size
            # The newest entry stays even when it alone exceeds max_bytes (one message's
            # size bounds it).
            while len(self._sources) > 1 and (
                len(self._sources) > self._max or self._bytes > self._max_bytes
            ):
                self._evict("count" if len(self._sources) > self._max else "bytes")
        else:
            state.last_seen = now
            self._sources.move_to_end(source_id)
        return state

    def _forget_idle(self, now: float) -> None:
        horizon = now - self._idle_s
        while self._sources:
            oldest = next(iter(self._sources.values()))
            if oldest.last_seen >= horizon:
                return
            self._evict("idle")

    def _evict(self, cause: str) -> None:
        _, state = self._sources.popitem(last=False)
        self._bytes -= state.size
        self._on_evict(cause)

    def peek(self, source_id: str) -> SourceState | None:
        return self._sources.get(source_id)

    def processed_marks(self) -> dict[str, int]:
        """Snapshot of every source's processed watermark."""
        return {sid: s.processed for sid, s in self._sources.items()}

    @property
    def approximate_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sources)
