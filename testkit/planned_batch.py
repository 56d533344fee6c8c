"""A decode pass's batch as `DraftPlanner.plan` reads it (service/engine/batch_layout.py's
DecodeBatch, the fields planning uses), for driving the planner without an engine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def planned_batch(rows: list[Any], drafter: Any, backs_off: bool) -> SimpleNamespace:
    """`rows` (slots 0 .. n - 1, greedy, every one adapting) all drafted by `drafter`;
    `backs_off`: whether the planning backoff may skip their lookups (every row, or none)."""
    n = len(rows)
    return SimpleNamespace(
        rows=rows,
        drafters=[drafter] * n,
        hi=n,
        can_draft=True,
        adapts=[True] * n,
        backs_off=[backs_off] * n,
        backoff_rows=n if backs_off else 0,
    )
