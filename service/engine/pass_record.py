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
    rows: int  # rows of the decode pass (0: none ran)
    span: int  # the decode pass covered slots [0, span)
    methods: tuple[Method, ...]  # per decode row, by slot
    proposed: tuple[int, ...]  # per decode row: d_s, the drafts it proposed
    accepted: tuple[int, ...]  # per decode row: a_s (empty when the pass gave no verdict)
    drafts: int  # the largest d_s: the target verified drafts + 1 tokens per row
    draft_model: bool  # the draft model ran in the pass
    kv_bucket: int  # the CUDA graph's KV-length bucket of the target's pass (0: not graphed)
    steady: bool  # no CUDA graph was captured and no draft model caught up in this step
    prefill_s: float  # the prefill pass
    plan_s: float  # planning the drafts (drafters and the draft-length policy)
    forward_s: float  # the call of the target's forward (on CUDA: its launch or graph replay)
    verify_s: float  # from the forward's call to the verdicts on the host (the one synchronisation)
    absorb_s: float  # from the verdicts to the step's end: counters, tokens, the policy's bookkeeping
    total_s: float  # the whole step


PassObserver = Callable[[PassRecord], None]


def notify(observers: list[PassObserver], record: PassRecord) -> None:
    """Calls each observer; one that raises is logged and does not disturb the engine."""
    for observer in observers:
        try:
            observer(record)
        except Exception:  # noqa: BLE001 - a diagnostic must not fail requests
            log.exception("pass_observer_failed")
