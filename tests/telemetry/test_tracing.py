"""Request spans and exemplars from the sidecar (docs/tracing.md), with the real reporter, the
real sidecar (OTel SDK, OTLP exporters) and a real OTLP/gRPC receiver:

- a traced record makes one span: the service's trace and span id, the caller's span as
  parent (or none), the request's real start and end, the GenAI attributes and the record's
  speculative metrics as specdec.* attributes, the reporting service as resource;
- its histogram values carry an exemplar with that trace and span id and the request id,
  which never becomes a series attribute;
- an unsampled caller, an untraced record, a duplicate, a rejected record: no span, no
  exemplar;
- a malformed trace context: ignored and counted by reason, the record still counted;
- tracing off: no span, no exemplar, no trace self-metric, the bulk histogram path kept.
"""

from __future__ import annotations

import random
import time

from opentelemetry.proto.trace.v1 import trace_pb2

from service.reporting import MetricsReporter
from specdec.v1 import metrics_pb2, telemetry_pb2
from telemetry.aggregation import REQUEST_DURATION, TTFT
from tests.telemetry.support import (
    IDENTITIES,
    attrs_of,
    expected_totals,
    simulate_metrics,
    span_attrs,
    wait_for,
)

FINISH_NAMES = {1: "eos", 2: "stop_sequence", 3: "length", 4: "cancelled", 5: "error"}
HISTOGRAMS = (
    "specdec.request.accept_rate",
    "specdec.request.accept_length",
    TTFT,
    "gen_ai.server.time_per_output_token",
    REQUEST_DURATION,
)


def _trace(
    i: int, *, parent: bool, flags: int = 1, state: str = "", operation: str = "chat"
) -> telemetry_pb2.RequestTrace:
    t = telemetry_pb2.RequestTrace(
        trace_id=bytes([i]) * 16,
        span_id=bytes([i + 100]) * 8,
        operation_name=operation,
        max_tokens=64 + i,
        temperature=0.5,
        top_k=7,
    )
    if parent:
        t.parent_span_id = bytes([i + 200]) * 8
        t.trace_flags = flags
        t.trace_state = state
    return t


def _record(rng: random.Random, identity, request_id: str) -> metrics_pb2.SpeculativeMetrics:
    m = simulate_metrics(rng, identity, request_id=request_id, instance_id="svc-7", passes=12)
    m.finish_reason = metrics_pb2.FINISH_REASON_LENGTH  # a success: TTFT/TPOT recorded
    if not m.completion_tokens:
        m.completion_tokens = 1
        m.time_to_first_token_seconds = m.queue_time_seconds + 0.01
        m.duration_seconds = max(m.duration_seconds, m.time_to_first_token_seconds)
    return m


def _sidecar(factory, receiver, tracing: bool):
    argv = ["--exporters", "otlp"] + (["--tracing", "true"] if tracing else [])
    return factory(
        argv, env={**receiver.env(), **receiver.traces_env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    )


def _report(sidecar, records) -> None:
    reporter = MetricsReporter(sidecar.address, instance_id="svc-7").start()
    for m, t in records:
        reporter.report(m, t.SerializeToString() if t is not None else b"")
    assert reporter.flush(15)
    reporter.stop(1)


def _histogram_points(store, name: str) -> list:
    return [p for _, metric, kind, p in store.points() if kind == "histogram" and metric.name == name]


def _counters(receiver) -> dict:
    return receiver.store.counter_totals()


def test_span_attributes_parent_and_exemplars(otlp_grpc_receiver, sidecar_thread_factory):
    sc = _sidecar(sidecar_thread_factory, otlp_grpc_receiver, tracing=True)
    rng = random.Random(11)
    # one record per identity, so each histogram point holds one record's values
    child = _record(rng, IDENTITIES[0], "req-child")
    root = _record(rng, IDENTITIES[1], "req-root")
    untraced = _record(rng, IDENTITIES[2], "req-untraced")
    unsampled = _record(rng, IDENTITIES[3], "req-unsampled")
    child_trace = _trace(1, parent=True, state="vendor=abc,other=1")
    root_trace = _trace(2, parent=False, operation="text_completion")
    _report(
        sc,
        [
            (child, child_trace),
            (root, root_trace),
            (untraced, None),
            (unsampled, _trace(4, parent=True, flags=0)),
        ],
    )

    spans = wait_for(
        lambda: len(otlp_grpc_receiver.span_store.spans()) >= 2 and otlp_grpc_receiver.span_store.spans(),
        10,
        what="two spans",
    )
    time.sleep(0.3)  # a third span (which must not exist) would have come by now
    spans = otlp_grpc_receiver.span_store.spans()
    by_id = {span.span_id: (res, span) for res, span in spans}
    assert set(by_id) == {child_trace.span_id, root_trace.span_id}, spans

    res, span = by_id[child_trace.span_id]
    assert span.trace_id == child_trace.trace_id
    assert span.parent_span_id == child_trace.parent_span_id
    assert span.trace_state == "vendor=abc,other=1"
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert span.name == f"chat {child.target_model}"
    end_ns = child.end_time.ToNanoseconds()
    assert span.end_time_unix_nano == end_ns
    assert span.start_time_unix_nano == end_ns - round(child.duration_seconds * 1e9)
    assert res["service.name"] == "specdec" and res["service.instance.id"] == "svc-7"
    a = span_attrs(span)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == child.target_model
    assert a["gen_ai.response.id"] == a["specdec.request.id"] == "req-child"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.input_tokens"] == child.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == child.completion_tokens
    assert a["gen_ai.request.max_tokens"] == 65 and a["gen_ai.request.top_k"] == 7
    assert a["gen_ai.request.temperature"] == 0.5 and "gen_ai.request.seed" not in a
    assert a["gen_ai.response.time_to_first_chunk"] == child.time_to_first_token_seconds
    assert a["specdec.method"] == "ngram" and a["specdec.num_draft_tokens"] == 4
    for field in (
        "verify_passes",
        "draft_passes",
        "proposed_drafts",
        "accepted_drafts",
        "accept_rate",
        "accept_length",
        "queue_time_seconds",
    ):
        assert a[f"specdec.{field}"] == getattr(child, field), field
    for field in ("accept_histogram", "proposed_per_position", "accepted_per_position"):
        assert a[f"specdec.{field}"] == tuple(getattr(child, field)), field
    events = {e.name: e.time_unix_nano for e in span.events}
    assert events["first_token"] == span.start_time_unix_nano + round(child.time_to_first_token_seconds * 1e9)

    res, span = by_id[root_trace.span_id]
    assert span.trace_id == root_trace.trace_id and span.parent_span_id == b""
    assert span.name == f"text_completion {root.target_model}"

    # Exemplars: the traced records' trace and span ids and request ids, on every histogram
    # they have a value in; none for the untraced and the unsampled record.
    wait_for(
        lambda: _histogram_points(otlp_grpc_receiver.store, REQUEST_DURATION), 10, what="histogram points"
    )
    traced = {frozenset(attrs_of(child)): (child, child_trace), frozenset(attrs_of(root)): (root, root_trace)}
    # (The SDK reports an exemplar in the first collection after its measurement only.)
    seen = set()
    for name in HISTOGRAMS:
        for p in _histogram_points(otlp_grpc_receiver.store, name):
            attrs = frozenset(span_attrs(p).items())
            assert "specdec.request.id" not in dict(attrs), (name, attrs)
            if attrs not in traced:
                assert not p.exemplars, (name, attrs)
                continue
            m, t = traced[attrs]
            assert len(p.exemplars) <= 1, (name, p)
            for ex in p.exemplars:
                assert (ex.trace_id, ex.span_id) == (t.trace_id, t.span_id)
                assert span_attrs(ex) == {"specdec.request.id": m.request_id}
                assert ex.as_double == p.sum  # the point's only value
                seen.add((name, m.request_id))
    assert {(REQUEST_DURATION, "req-child"), (TTFT, "req-child"), (REQUEST_DURATION, "req-root")} <= seen

    counters = _counters(otlp_grpc_receiver)
    for key, value in expected_totals([child, root, untraced, unsampled]).items():
        if "#" not in key[0]:
            assert counters.get(key) == value, key
    ignored = {k: v for k, v in counters.items() if k[0] == "specdec.sidecar.trace_contexts.ignored"}
    assert ignored and not any(ignored.values()), ignored


def _bad_traces() -> dict[str, telemetry_pb2.RequestTrace]:
    def t(**changes):
        base = _trace(3, parent=True)
        for k, v in changes.items():
            setattr(base, k, v)
        return base

    return {
        "trace_id_invalid": t(trace_id=b"\x01" * 15),
        "span_id_invalid": t(span_id=bytes(8)),
        "parent_span_id_invalid": t(parent_span_id=b"\x01" * 7),
        "trace_flags_invalid": t(trace_flags=256),
        "trace_state_too_long": t(trace_state="k=" + "v" * 511),
        "trace_state_invalid": t(trace_state="not a list member"),
        "operation_name_invalid": t(operation_name="embeddings"),
    }


def test_malformed_trace_context_is_ignored_and_counted(otlp_grpc_receiver, sidecar_thread_factory):
    sc = _sidecar(sidecar_thread_factory, otlp_grpc_receiver, tracing=True)
    rng = random.Random(12)
    bad = _bad_traces()
    records = [(_record(rng, None, f"req-{reason}"), t) for reason, t in bad.items()]
    zero_trace_id = _trace(5, parent=False)
    zero_trace_id.trace_id = bytes(16)
    records.append((_record(rng, None, "req-zero"), zero_trace_id))
    records.append((_record(rng, None, "r" * 129), _trace(6, parent=False)))
    _report(sc, records)

    expected = {reason: 1 for reason in bad}
    expected["trace_id_invalid"] = 2
    expected["identity_too_long"] = 1

    def ignored():
        got = {
            dict(k[1])["reason"]: v
            for k, v in _counters(otlp_grpc_receiver).items()
            if k[0] == "specdec.sidecar.trace_contexts.ignored" and v
        }
        return got if got == expected else None

    wait_for(ignored, 10, what=f"ignored trace contexts {expected}")
    counters = _counters(otlp_grpc_receiver)
    for key, value in expected_totals([m for m, _ in records]).items():  # every record counted
        if "#" not in key[0]:
            assert counters.get(key) == value, key
    assert counters[("specdec.sidecar.records.rejected", frozenset({("reason", "internal_error")}))] == 0
    time.sleep(0.3)
    assert otlp_grpc_receiver.span_store.spans() == []
    for name in HISTOGRAMS:
        assert not any(p.exemplars for p in _histogram_points(otlp_grpc_receiver.store, name))


def test_tracing_off_produces_no_span_and_no_exemplar(otlp_grpc_receiver, sidecar_thread_factory):
    sc = _sidecar(sidecar_thread_factory, otlp_grpc_receiver, tracing=False)
    assert sc.sidecar.spans is None
    histograms = sc.sidecar.aggregator._histograms
    assert all(
        histograms.is_bulk(h) for h in (sc.sidecar.aggregator.h_duration, sc.sidecar.aggregator.h_ttft)
    )
    rng = random.Random(13)
    records = [(_record(rng, None, f"req-{i}"), _trace(i + 1, parent=bool(i % 2))) for i in range(20)]
    _report(sc, records)
    wait_for(
        lambda: _counters(otlp_grpc_receiver).get(("specdec.sidecar.records.aggregated", frozenset())) == 20,
        10,
        what="20 records",
    )
    time.sleep(0.3)
    assert otlp_grpc_receiver.span_store.spans() == []
    for name in HISTOGRAMS:
        assert not any(p.exemplars for p in _histogram_points(otlp_grpc_receiver.store, name))
    assert not any(k[0] == "specdec.sidecar.trace_contexts.ignored" for k in _counters(otlp_grpc_receiver))


def test_duplicates_and_rejected_records_get_no_span(otlp_grpc_receiver, sidecar_thread_factory):
    sc = _sidecar(sidecar_thread_factory, otlp_grpc_receiver, tracing=True)
    rng = random.Random(14)
    good = _record(rng, IDENTITIES[0], "req-once")
    bad = _record(rng, IDENTITIES[0], "req-rejected")
    bad.accepted_drafts += 1  # breaks the contract's invariants: rejected
    req = telemetry_pb2.ReportRequest(source_id="svc-7/1")
    req.records.add(sequence=1, metrics=good, trace=_trace(7, parent=True))
    req.records.add(sequence=2, metrics=bad, trace=_trace(8, parent=True))
    first = sc.sidecar.ingestor.process(req)
    again = sc.sidecar.ingestor.process(req)  # a resend: both are duplicates now
    assert (first.accepted, first.rejected, again.duplicates) == (1, 1, 2)
    wait_for(lambda: otlp_grpc_receiver.span_store.spans(), 10, what="a span")
    time.sleep(0.3)
    spans = otlp_grpc_receiver.span_store.spans()
    assert [span_attrs(span)["specdec.request.id"] for _, span in spans] == ["req-once"]
