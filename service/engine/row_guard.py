"""One request's host-side work, run so that its failure fails that request alone."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from service.engine.api import FinishReason
from service.engine.output import OutputProcessor
from service.engine.sequence import Sequence

log = structlog.get_logger(__name__)


class RowGuard:
    def __init__(self, output: OutputProcessor, release: Callable[[Sequence], None]) -> None:
        self.output = output
        self.release = release  # gives a finished row's slot back

    def fail(self, seq: Sequence, exc: Exception) -> None:
        log.exception("request_failed", request_id=seq.request_id)
        self.output.finish(seq, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")

    def run(self, seq: Sequence, work: Callable[[], None]) -> None:
        """Runs `work`; an exception fails the row; a row that has finished is released."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001
            self.fail(seq, exc)
        if seq.finished:
            self.release(seq)
