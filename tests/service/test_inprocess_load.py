"""bench/common/inprocess_load.py: specdec-bench's pacings against an engine in the process."""

from __future__ import annotations

import threading

from bench.common.inprocess_load import run_inprocess
from service.client.loadgen.runner import Pacing
from service.engine.api import FinalResult, FinishReason, GenerationRequest
from specdec.v1 import metrics_pb2


class SlowEngine:
    """Ends every request `seconds` after it was submitted, from a thread of its own."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def submit(self, request: GenerationRequest, on_event) -> None:
        def finish() -> None:
            on_event(
                FinalResult(request.request_id, FinishReason.LENGTH, 3, 1, metrics_pb2.SpeculativeMetrics())
            )

        threading.Timer(self.seconds, finish).start()


def test_burst_rounds_run_one_after_the_other() -> None:
    def make(index: int) -> GenerationRequest:
        return GenerationRequest(f"r{index}", (1, 2, 3), max_tokens=1)

    _, records = run_inprocess(SlowEngine(0.02), make, Pacing("burst", 3, rounds=3), timeout_s=5.0)
    assert [r.index for r in records] == list(range(9))
    for round_start in (3, 6):
        earlier, later = records[:round_start], records[round_start : round_start + 3]
        assert max(r.end for r in earlier) <= min(r.start for r in later)
    # One round's requests go out together, before any of them ended.
    assert all(r.start < min(q.end for q in records[:3]) for r in records[:3])
