"""What one scheduler step did, for pass observers (Engine.add_pass_observer): benchmarks
and diagnostics read the engine's passes through this record, not through its internals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from service.engine.api import Method

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PassRecord:
    """One scheduler step: a prefill pass (if any row was prefilling), then a decode pass (if
    any row was decoding). Times are host seconds (time.perf_counter) on the engine thread."""

    admitted: int  # requests admitted since the previous step
    prefill_rows: int  # rows the prefill pass fed (0: no prefill pass)
    steady: bool  # no CUDA graph was captured and no draft model caught up in this step
    total_s: float  # the whole step
    prefill_s: float  # the prefill pass
    # The decode pass (all zero or empty when none ran):
    rows: int = 0  # its rows
    span: int = 0  # it covered slots [0, span)
    methods: tuple[Method, ...] = ()  # per row, by slot
    proposed: tuple[int, ...] = ()  # per row: d_s, the drafts it proposed
    accepted: tuple[int, ...] = ()  # per row: a_s (empty when the pass gave no verdict)
    drafts: int = 0  # the largest d_s: the target verified drafts + 1 tokens per row
    draft_model: bool = False  # the draft model ran in the pass
    kv_bucket: int = 0  # the CUDA graph's KV-length bucket of the target's pass (0: not graphed)
    plan_s: float = 0.0  # planning the drafts (drafters and the draft-length policy)
    forward_s: float = 0.0  # the call of the target's forward (on CUDA: its launch or graph replay)
    verify_s: float = 0.0  # from the forward's call to the verdicts on the host (the one synchronisation)
    absorb_s: float = 0.0  # from the verdicts to the step's end: counters, tokens, the policy's bookkeeping


PassObserver = Callable[[PassRecord], None]


def notify(observers: list[PassObserver], record: PassRecord) -> None:
    """Calls each observer; one that raises is logged and does not disturb the engine."""
    for observer in observers:
        try:
            observer(record)
        except Exception:  # noqa: BLE001 - a diagnostic must not fail requests
            log.exception("pass_observer_failed")
