"""Per-source sequence watermarks: duplicate detection and acknowledgement state.

A source (one reporter process: instance id + per-start nonce) numbers its records 1, 2, 3, ...
and sends them in increasing order; after a reconnect it resends, in order, everything that was
not acknowledged. So one integer per source is an exact duplicate filter: a record whose
sequence is <= the highest sequence already processed from that source has been seen
(gaps are records the source dropped from its full buffer and never sent).

`processed` advances as batches are processed (counted, duplicate or rejected); `durable`
advances when an export that included them succeeded (OTLP mode) and is what the sidecar
acknowledges in that mode. The table is bounded: the least recently active sources are
forgotten first (a forgotten source that comes back is treated as new; its resent records
would then count again, so the bound is generous).
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_MAX_SOURCES = 100_000


class SourceState:
    __slots__ = ("source_id", "processed", "durable")

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id
        self.processed = 0  # highest sequence processed (counted, duplicate or rejected)
        self.durable = 0  # highest sequence included in a successful export


class SourceTable:
    """Not thread-safe: owned by the ingest event loop (snapshots are taken under the
    aggregation lock, which the ingest also holds while it advances `processed`)."""

    def __init__(self, max_sources: int = DEFAULT_MAX_SOURCES) -> None:
        self._sources: OrderedDict[str, SourceState] = OrderedDict()
        self._max = max_sources

    def get(self, source_id: str) -> SourceState:
        state = self._sources.get(source_id)
        if state is None:
            state = SourceState(source_id)
            self._sources[source_id] = state
            if len(self._sources) > self._max:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source_id)
        return state

    def peek(self, source_id: str) -> SourceState | None:
        return self._sources.get(source_id)

    def processed_marks(self) -> dict[str, int]:
        """Snapshot of every source's processed watermark."""
        return {sid: s.processed for sid, s in self._sources.items()}

    def __len__(self) -> int:
        return len(self._sources)
