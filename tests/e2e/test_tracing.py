"""End to end, request traces (docs/tracing.md): real gRPC clients send W3C `traceparent`
metadata to the real service (in-process, tiny model, `--tracing true`), which reports to a
real sidecar subprocess (`python -m telemetry --tracing true`) exporting spans and metrics
over OTLP/gRPC to a receiver built in the test.

- A request with a traceparent gets one span in the caller's trace, child of the caller's
  span, whose attributes equal the metrics the client received in its final message and
  whose start and end bracket the call as the client timed it.
- A request without one, or with a malformed one, gets a root span in a trace of its own.
- The duration histogram's exemplars name these spans and their request ids.
- A service with tracing off sends no trace context: no span, no exemplar, although the
  sidecar traces.
- The trace context is captured on the event loop; the engine thread only hands the
  captured bytes on with the record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from tests.e2e.conftest import EXPORT_INTERVAL_MS, NGRAM, NONE
from tests.service.conftest import ServiceThread, service_config
from tests.telemetry.support import SidecarProcess, span_attrs, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
# Wall clock vs. the service's monotonic timings: the span's start is end_time minus the
# monotonic duration, so it may differ from the client's wall clock by the clocks' drift
# over one request plus the timestamp resolution; 5 ms is far above both.
CLOCK_SLACK_NS = 5_000_000


@pytest.fixture
def tracing_sidecar(otlp_receiver, tmp_path) -> Iterator[SidecarProcess]:
    p = SidecarProcess(
        extra_args=["--exporters", "otlp", "--tracing", "true", "--log-level", "WARNING"],
        env={
            **otlp_receiver.env(),
            **otlp_receiver.traces_env(),
            "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS),
        },
        log_path=tmp_path / "sidecar.log",
    )
    p.start()
    yield p
    p.kill()


@pytest.fixture
def start_traced_service(e2e_model_dir, tracing_sidecar):
    started: list[ServiceThread] = []

    def start(**overrides) -> ServiceThread:
        overrides.setdefault("telemetry_target", tracing_sidecar.address)
        overrides.setdefault("adaptive_draft_length", False)
        thread = ServiceThread(service_config(e2e_model_dir, **overrides)).start()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


def _call(stub, request_id: str, prompt: str, max_tokens: int, method: int, metadata=()):
    req = generation_pb2.GenerateRequest(request_id=request_id, text=prompt, max_tokens=max_tokens)
    req.sampling.temperature = 0.0
    req.speculation.method = method
    if method == NGRAM:
        req.speculation.num_draft_tokens = 3
    before = time.time_ns()
    final = [r.final for r in stub.Generate(req, metadata=metadata, timeout=60) if r.HasField("final")][0]
    return final, before, time.time_ns()


def _spans_by_request(receiver) -> dict:
    return {span_attrs(span)["specdec.request.id"]: (res, span) for res, span in receiver.span_store.spans()}


def test_spans_follow_the_incoming_trace_context(start_traced_service, otlp_receiver):
    service = start_traced_service(tracing=True, instance_id="traced-svc")
    with grpc.insecure_channel(service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        child, c0, c1 = _call(
            stub,
            "child",
            "a a a a a a a a",
            16,
            NGRAM,
            (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "congo=t61rcWkgMzE")),
        )
        root, _, _ = _call(stub, "root", "The quick brown fox", 6, NONE)
        bad, _, _ = _call(
            stub,
            "bad",
            "The quick brown fox",
            5,
            NONE,
            (("traceparent", f"00-{TRACE_ID}-0000000000000000-01"),),
        )
    assert service.service.reporter.flush(30)
    spans = wait_for(
        lambda: (lambda s: s if len(s) == 3 else None)(_spans_by_request(otlp_receiver)),
        15,
        what="three spans",
    )

    res, span = spans["child"]
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    assert span.trace_state == "congo=t61rcWkgMzE"
    assert res["service.name"] == "specdec" and res["service.instance.id"] == "traced-svc"
    assert c0 - CLOCK_SLACK_NS <= span.start_time_unix_nano <= span.end_time_unix_nano <= c1 + CLOCK_SLACK_NS
    m = child.metrics
    assert m.accepted_drafts > 0  # a request where drafts were accepted
    a = span_attrs(span)
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == m.target_model
    assert a["gen_ai.usage.input_tokens"] == child.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == child.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.request.max_tokens"] == 16 and a["gen_ai.request.temperature"] == 0.0
    for field in (
        "verify_passes",
        "draft_passes",
        "proposed_drafts",
        "accepted_drafts",
        "accept_rate",
        "accept_length",
        "queue_time_seconds",
    ):
        assert a[f"specdec.{field}"] == getattr(m, field), field
    for field in ("accept_histogram", "proposed_per_position", "accepted_per_position"):
        assert a[f"specdec.{field}"] == tuple(getattr(m, field)), field
    assert a["specdec.num_draft_tokens"] == 3 and a["specdec.method"] == "ngram"

    for name in ("root", "bad"):
        _, span = spans[name]
        assert span.parent_span_id == b"", name
        assert span.trace_id.hex() != TRACE_ID and span.trace_id != bytes(16), name
    assert spans["root"][1].trace_id != spans["bad"][1].trace_id

    # The duration histogram's exemplars lead to these spans and requests.
    by_ids = {(span.trace_id, span.span_id): rid for rid, (_, span) in spans.items()}

    def exemplars():
        found = [
            ex
            for _, metric, kind, p in otlp_receiver.store.points()
            if kind == "histogram" and metric.name == "gen_ai.server.request.duration"
            for ex in p.exemplars
        ]
        return found if len(found) >= 2 else None  # two series: ngram/k=3 and none/k=0

    found = wait_for(exemplars, 15, what="exemplars on the duration histogram")
    for ex in found:
        assert by_ids[(ex.trace_id, ex.span_id)] == span_attrs(ex)["specdec.request.id"]
    assert by_ids[(spans["child"][1].trace_id, spans["child"][1].span_id)] == "child"
    assert any(span_attrs(ex)["specdec.request.id"] == "child" for ex in found)


def test_service_with_tracing_off_sends_no_trace_context(start_traced_service, otlp_receiver):
    service = start_traced_service(tracing=False)
    with grpc.insecure_channel(service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for i in range(3):
            final, _, _ = _call(
                stub,
                f"off-{i}",
                "a a a a a a a a",
                8,
                NGRAM,
                (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
            )
            assert final.finish_reason == metrics_pb2.FINISH_REASON_LENGTH
    assert service.service.reporter.flush(30)
    wait_for(
        lambda: (
            otlp_receiver.store.counter_totals().get(("specdec.sidecar.records.aggregated", frozenset())) == 3
        ),
        15,
        what="3 records exported",
    )
    time.sleep(0.5)  # spans would be exported within 50 ms (OTEL_BSP_SCHEDULE_DELAY)
    assert otlp_receiver.span_store.spans() == []
    assert not any(p.exemplars for _, _, kind, p in otlp_receiver.store.points() if kind == "histogram")


def test_trace_work_stays_off_the_engine_thread(start_traced_service, otlp_receiver, monkeypatch):
    import service.api.servicer as servicer_module

    captured_on: list[str] = []
    reported: list[tuple[str, bytes]] = []
    real_capture = servicer_module.capture

    def spy(metadata, request):
        captured_on.append(threading.current_thread().name)
        return real_capture(metadata, request)

    monkeypatch.setattr(servicer_module, "capture", spy)
    service = start_traced_service(tracing=True)
    real_report = service.service.reporter.report

    def report(metrics, trace=b""):
        reported.append((threading.current_thread().name, trace))
        real_report(metrics, trace)

    service.service.reporter.report = report  # instance attribute: Service._on_final calls it
    with grpc.insecure_channel(service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        _call(stub, "t-1", "a a a a a a a a", 6, NGRAM, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    assert captured_on == ["service"]  # ServiceThread's event loop
    ((thread, trace),) = reported
    assert thread == "specdec-engine" and trace.startswith(b"\x0a\x10")  # the bytes, ready
