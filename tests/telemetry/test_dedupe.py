"""The duplicate filter's per-source table: bounded by count, by memory and by idle time, and
every eviction counted (docs/metrics.md, "Delivery semantics")."""

from __future__ import annotations

from telemetry.dedupe import ENTRY_OVERHEAD_BYTES, SourceTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(**kwargs) -> tuple[SourceTable, list[str], Clock]:
    evicted: list[str] = []
    clock = Clock()
    return SourceTable(on_evict=evicted.append, clock=clock, **kwargs), evicted, clock


def test_the_least_recently_active_source_goes_first_beyond_max_sources() -> None:
    sources, evicted, _ = table(max_sources=2)
    sources.get("a").processed = 5
    sources.get("b")
    sources.get("a")  # a is active again: b is now the least recently active
    sources.get("c")
    assert evicted == ["count"]
    assert sources.peek("b") is None and sources.peek("a").processed == 5 and len(sources) == 2


def test_long_source_ids_are_bounded_by_memory() -> None:
    sources, evicted, _ = table(max_bytes=3 * (1000 + ENTRY_OVERHEAD_BYTES))
    for name in "abcd":
        sources.get(name * 1000)
    assert evicted == ["bytes"] and len(sources) == 3
    assert sources.approximate_bytes <= 3 * (1000 + ENTRY_OVERHEAD_BYTES)
    sources.get("e" * 100_000)  # one id larger than the whole budget: it alone stays
    assert len(sources) == 1 and evicted == ["bytes"] * 4


def test_a_silent_source_is_forgotten_after_the_idle_time() -> None:
    sources, evicted, clock = table(idle_s=60.0)
    sources.get("quiet").processed = 7
    sources.get("busy")
    clock.now += 50
    sources.get("busy")
    clock.now += 20  # quiet: silent for 70 s; busy: for 20 s
    sources.get("busy")
    assert evicted == ["idle"] and sources.peek("quiet") is None
    # A forgotten source that comes back starts over: its resent records would count again.
    assert sources.get("quiet").processed == 0


def test_the_watermark_is_remembered_while_the_source_is_in_the_table() -> None:
    sources, evicted, clock = table(max_sources=3, idle_s=60.0)
    sources.get("s").processed = 9
    for _ in range(10):
        clock.now += 59
        sources.get("s")
    assert sources.get("s").processed == 9 and evicted == []
