"""Ingest over real gRPC into an in-process sidecar (Prometheus endpoint, ack on aggregation):
invariant rejection with reasons, dedupe, malformed input, health and reflection."""

from __future__ import annotations

import random
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from specdec.v1 import telemetry_pb2, telemetry_pb2_grpc
from tests.telemetry.mutations import MUTATIONS, base_record, broken
from tests.telemetry.support import SidecarThread, simulate_metrics


@pytest.fixture(scope="module")
def sidecar():
    s = SidecarThread(
        ["--listen", "127.0.0.1:0", "--exporters", "prometheus", "--prometheus-address", "127.0.0.1:0"]
    )
    yield s
    s.stop()


def scrape(s: SidecarThread) -> dict:
    with urllib.request.urlopen(f"http://{s.sidecar.prometheus_address}/metrics") as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def send(address: str, requests: list[telemetry_pb2.ReportRequest]):
    with grpc.insecure_channel(address) as ch:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(ch)
        return list(stub.Report(iter(requests), timeout=30))


def batch(source: str, records, start: int = 1, dropped_before=()):
    """dropped_before: {index in records: count}."""
    req = telemetry_pb2.ReportRequest(source_id=source)
    drops = dict(dropped_before)
    for i, m in enumerate(records):
        rec = req.records.add(sequence=start + i, dropped_before=drops.get(i, 0))
        if m is not None:
            rec.metrics.CopyFrom(m)
    return req


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_record_is_rejected_and_counted_valid_neighbours_count(sidecar, name):
    reason = MUTATIONS[name][1]
    before = scrape(sidecar)
    good = base_record()
    resp = send(sidecar.address, [batch(f"inv-{name}", [good, broken(name), good])])
    assert len(resp) == 1
    assert (resp[0].accepted, resp[0].rejected, resp[0].duplicates) == (2, 1, 0)
    assert resp[0].acknowledged_through_sequence == 3  # rejected records are acknowledged too
    after = scrape(sidecar)
    assert (
        total(after, "specdec_sidecar_records_rejected_total", reason=reason)
        - total(before, "specdec_sidecar_records_rejected_total", reason=reason)
        == 1
    )
    model = {"gen_ai_request_model": "tgt-a", "specdec_method": "draft_model"}
    assert (
        total(after, "specdec_requests_total", **model) - total(before, "specdec_requests_total", **model)
        == 2
    )
    assert (
        total(after, "specdec_accepted_drafts_total", **model)
        - total(before, "specdec_accepted_drafts_total", **model)
        == 2 * good.accepted_drafts
    )


def test_ingest_level_rejections(sidecar):
    before = scrape(sidecar)
    good = base_record()
    req = batch("ingest-level", [good, None, good])  # seq 2 has no metrics
    req.records.add(sequence=0).metrics.CopyFrom(good)  # sequence 0 is invalid
    resp = send(sidecar.address, [req, batch("", [good, good])])
    assert (resp[0].accepted, resp[0].rejected) == (2, 2)
    assert (resp[1].accepted, resp[1].rejected) == (0, 2)
    after = scrape(sidecar)
    for reason, n in (("missing_metrics", 1), ("invalid_sequence", 1), ("missing_source_id", 2)):
        assert (
            total(after, "specdec_sidecar_records_rejected_total", reason=reason)
            - total(before, "specdec_sidecar_records_rejected_total", reason=reason)
            == n
        )


def test_duplicates_dropped_across_streams(sidecar):
    rng = random.Random(11)
    records = [simulate_metrics(rng) for _ in range(30)]
    before = scrape(sidecar)
    r1 = send(sidecar.address, [batch("dup-src", records[:10]), batch("dup-src", records[5:20], start=6)])
    assert [(r.accepted, r.duplicates, r.acknowledged_through_sequence) for r in r1] == [
        (10, 0, 10),
        (10, 5, 20),
    ]
    # a "reconnect": a new stream resends everything from 1, then continues
    r2 = send(sidecar.address, [batch("dup-src", records[:30])])
    assert (r2[0].accepted, r2[0].duplicates, r2[0].acknowledged_through_sequence) == (10, 20, 30)
    after = scrape(sidecar)
    assert (
        total(after, "specdec_sidecar_records_duplicate_total")
        - total(before, "specdec_sidecar_records_duplicate_total")
        == 25
    )
    assert total(after, "specdec_requests_total") - total(before, "specdec_requests_total") == 30
    assert total(after, "specdec_proposed_drafts_total") - total(
        before, "specdec_proposed_drafts_total"
    ) == sum(m.proposed_drafts for m in records)


def test_service_dropped_records_ride_on_new_records_once(sidecar):
    """dropped_before counts when its record is processed as new and valid, never for a
    rejected record (the issue's case: 2^40 drops on rejected records fired the alert), a
    duplicate, a record with sequence 0, or an absurd value."""
    before = scrape(sidecar)
    good = base_record()
    bad = broken(sorted(MUTATIONS)[0])
    resp = send(
        sidecar.address,
        [
            batch("drops-a", [good, good], dropped_before={0: 5}),  # seq 1 after 5 drops
            batch("drops-a", [good, bad], start=9, dropped_before={0: 6, 1: 1000}),  # rejected: not
            batch("drops-a", [good, good, good], start=9, dropped_before={0: 6, 2: 4}),  # 9, 10 dup
            batch("drops-b", [good], dropped_before={0: 3}),
        ],
    )
    assert [(r.accepted, r.duplicates, r.rejected) for r in resp] == [
        (2, 0, 0),
        (1, 0, 1),
        (1, 2, 0),
        (1, 0, 0),
    ]
    req = batch("drops-c", [good, good], start=0, dropped_before={0: 100})  # seq 0: invalid
    req.records.add(sequence=2, dropped_before=2**41).metrics.CopyFrom(good)  # absurd count
    resp = send(sidecar.address, [req])
    assert (resp[0].accepted, resp[0].rejected) == (1, 2)
    after = scrape(sidecar)
    assert (
        total(after, "specdec_sidecar_service_dropped_records_total")
        - total(before, "specdec_sidecar_service_dropped_records_total")
        == 5 + 6 + 4 + 3
    )


def test_self_metric_series_exist_at_zero_before_any_event():
    """Every rejection reason (and, with OTLP, the exporter's failure counter) is a series at
    0 from start-up, so that the first event is an increase Prometheus can see."""
    from telemetry.validation import REASONS

    s = SidecarThread(
        ["--listen", "127.0.0.1:0", "--exporters", "prometheus", "--prometheus-address", "127.0.0.1:0"]
    )
    try:
        samples = scrape(s)
        rejected = {
            dict(ls)["reason"]: v
            for (n, ls), v in samples.items()
            if n == "specdec_sidecar_records_rejected_total"
        }
        assert rejected == {reason: 0 for reason in REASONS}
        for name in (
            "records_received",
            "records_aggregated",
            "records_duplicate",
            "service_dropped_records",
        ):
            assert [v for (n, _), v in samples.items() if n == f"specdec_sidecar_{name}_total"] == [0], name
        # no OTLP exporter configured: no export-failure series
        assert not any(n.startswith("specdec_sidecar_export_failures") for n, _ in samples)
        # the first rejection of a reason is an increase from 0 to 1
        send(s.address, [batch("first-rejection", [base_record(), None])])
        after = scrape(s)
        assert total(after, "specdec_sidecar_records_rejected_total", reason="missing_metrics") == 1
    finally:
        s.stop()


def test_garbage_does_not_crash_the_sidecar(sidecar):
    before = scrape(sidecar)
    with grpc.insecure_channel(sidecar.address) as ch:
        raw = ch.stream_stream(
            "/specdec.v1.TelemetryService/Report",
            request_serializer=None,
            response_deserializer=telemetry_pb2.ReportResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xff\xff\xff garbage"]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a batch of huge-k records with absurd arrays: rejected, never allocated per k
    huge = base_record()
    huge.num_draft_tokens = 2**32 - 1
    resp = send(sidecar.address, [batch("garbage-after", [huge, base_record()])])
    assert (resp[0].accepted, resp[0].rejected) == (1, 1)
    after = scrape(sidecar)
    assert (
        total(after, "specdec_sidecar_records_rejected_total", reason="malformed_batch")
        - total(before, "specdec_sidecar_records_rejected_total", reason="malformed_batch")
        == 1
    )


def test_health_and_reflection(sidecar):
    with grpc.insecure_channel(sidecar.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "specdec.v1.TelemetryService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in resp.list_services_response.service}
        assert "specdec.v1.TelemetryService" in names and "grpc.health.v1.Health" in names


def test_a_source_the_table_forgot_counts_again_and_the_eviction_is_counted():
    """The audit's case: a table of 2 sources; a resend after its source was evicted counts
    again (the documented window), and the eviction shows in the self-metric."""
    s = SidecarThread(
        [
            "--listen",
            "127.0.0.1:0",
            "--exporters",
            "prometheus",
            "--prometheus-address",
            "127.0.0.1:0",
            "--max-sources",
            "2",
        ]
    )
    try:
        series = {(name, dict(labels).get("cause")) for name, labels in scrape(s)}
        for cause in ("idle", "count", "bytes"):  # every cause exists at 0 from start-up
            assert ("specdec_sidecar_sources_evicted_total", cause) in series
        good = base_record()
        send(s.address, [batch("src-a", [good]), batch("src-b", [good]), batch("src-c", [good])])
        resent = send(s.address, [batch("src-a", [good])])  # src-a was forgotten
        assert (resent[0].accepted, resent[0].duplicates) == (1, 0)
        after = scrape(s)
        assert total(after, "specdec_requests_total") == 4
        assert total(after, "specdec_sidecar_sources_evicted_total", cause="count") == 2
    finally:
        s.stop()
