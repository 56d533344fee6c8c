"""The canonical log line: one per finished request, with its metrics."""

from __future__ import annotations

import structlog

from service.api.request_trace import CapturedTrace
from service.engine.api import FinalResult
from specdec_common.metrics_format import metrics_to_dict

log = structlog.get_logger("specdec.request")


def log_finished_request(result: FinalResult, trace: CapturedTrace | None = None) -> None:
    metrics = metrics_to_dict(result.metrics)
    metrics.pop("request_id", None)
    ids = {} if trace is None else {"trace_id": trace.trace_id, "span_id": trace.span_id}
    log.info(
        "request_finished",
        request_id=result.request_id,
        finish_reason=result.finish_reason.name.lower(),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        error=result.error,
        metrics=metrics,
        **ids,
    )
