"""service/api/request_trace.capture: the W3C trace context of a call's metadata, honoured when
valid, replaced by a new trace when not; what travels to the sidecar (docs/tracing.md)."""

from __future__ import annotations

import pytest

from service.api.request_trace import MAX_TRACE_STATE_CHARS, capture
from specdec.v1 import generation_pb2, telemetry_pb2

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _decode(captured) -> telemetry_pb2.RequestTrace:
    return telemetry_pb2.RequestTrace.FromString(captured.encoded)


def test_valid_traceparent_is_the_parent() -> None:
    req = generation_pb2.GenerateRequest(text="hi", max_tokens=5)
    req.sampling.temperature = 0.7
    req.sampling.seed = 9
    got = capture(
        (("user-agent", "x"), ("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")), req
    )
    t = _decode(got)
    assert got.trace_id == TRACE_ID and t.trace_id.hex() == TRACE_ID
    assert got.parent_span_id == PARENT_ID and t.parent_span_id.hex() == PARENT_ID
    assert len(t.span_id) == 8 and t.span_id.hex() == got.span_id != PARENT_ID
    assert t.trace_flags == 1 and t.trace_state == "a=1,b=2"
    assert t.operation_name == "text_completion"
    assert t.max_tokens == 5 and t.seed == 9 and t.temperature == pytest.approx(0.7)
    assert not t.HasField("top_p") and not t.HasField("top_k")


def test_unsampled_parent_keeps_its_flags() -> None:
    t = _decode(
        capture(
            (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"),), generation_pb2.GenerateRequest(text="hi")
        )
    )
    assert t.trace_id.hex() == TRACE_ID and t.trace_flags == 0


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),),  # zero id
        (("traceparent", f"00-{TRACE_ID}-0000000000000000-01"),),  # zero parent
        (("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01"),),  # forbidden version
        (("traceparent", f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"),),  # upper case hex
        (("traceparent", "garbage"),),
        (("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)),  # repeated: ambiguous
        (("traceparent-bin", b"\x00\x01"),),
    ],
    ids=["none", "zero-trace", "zero-parent", "version-ff", "upper-hex", "garbage", "repeated", "binary"],
)
def test_missing_or_invalid_traceparent_starts_a_trace(metadata) -> None:
    req = generation_pb2.GenerateRequest(messages={"messages": [{"role": "user", "content": "x"}]})
    first, second = capture(metadata, req), capture(metadata, req)
    t = _decode(first)
    assert len(t.trace_id) == 16 and t.trace_id != bytes(16) and len(t.span_id) == 8
    assert t.parent_span_id == b"" and t.trace_flags == 0 and t.trace_state == ""
    assert first.trace_id != second.trace_id  # a new trace each time
    assert t.trace_id.hex() != TRACE_ID
    assert t.operation_name == "chat"


def test_tracestate_longer_than_the_w3c_limit_is_dropped() -> None:
    members = ",".join(f"k{i}={'v' * 40}" for i in range(14))  # valid, 600+ characters
    assert len(members) > MAX_TRACE_STATE_CHARS
    t = _decode(
        capture(
            (("traceparent", TRACEPARENT), ("tracestate", members)), generation_pb2.GenerateRequest(text="hi")
        )
    )
    assert t.trace_id.hex() == TRACE_ID and t.trace_state == ""


def test_request_log_line_names_the_trace_and_span() -> None:
    from structlog.testing import capture_logs

    from service.api.request_log import log_finished_request
    from service.engine.api import FinalResult, FinishReason
    from specdec.v1 import metrics_pb2

    result = FinalResult("r-1", FinishReason.LENGTH, 3, 4, metrics_pb2.SpeculativeMetrics(request_id="r-1"))
    traced = capture((("traceparent", TRACEPARENT),), generation_pb2.GenerateRequest(text="hi"))
    with capture_logs() as logs:
        log_finished_request(result, traced)
        log_finished_request(result)
    assert logs[0]["event"] == "request_finished"
    assert (logs[0]["trace_id"], logs[0]["span_id"]) == (TRACE_ID, traced.span_id)
    assert "trace_id" not in logs[1] and "span_id" not in logs[1]
