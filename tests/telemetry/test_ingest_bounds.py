"""An ingest that trusts nobody (issue 20, findings 1, 4, 5, 6): what one reporter can do to
the numbers of the others is bounded. Real gRPC into an in-process sidecar, scraped through
its Prometheus endpoint."""

from __future__ import annotations

import math
import random
import threading
import time

import grpc
import pytest

from specdec.v1 import metrics_pb2, telemetry_pb2, telemetry_pb2_grpc
from telemetry.ingest import SLICE_RECORDS, TelemetryIngest
from tests.telemetry.mutations import base_record
from tests.telemetry.support import SidecarThread, simulate_metrics, wait_for
from tests.telemetry.test_ingest import batch, scrape, send, total

REJECTED = "specdec_sidecar_records_rejected_total"
NONE = metrics_pb2.SPECULATION_METHOD_NONE


def start(*argv: str) -> SidecarThread:
    return SidecarThread(
        ["--listen", "127.0.0.1:0", "--exporters", "prometheus", "--prometheus-address", "127.0.0.1:0", *argv]
    )


@pytest.fixture
def sidecar():
    s = start()
    yield s
    s.stop()


def record(seq: int, m, dropped_before: int = 0) -> telemetry_pb2.MetricsRecord:
    rec = telemetry_pb2.MetricsRecord(sequence=seq, dropped_before=dropped_before)
    rec.metrics.CopyFrom(m)
    return rec


def test_a_sequence_far_ahead_is_rejected_and_does_not_blank_out_the_source(sidecar):
    """The issue's blackout: a record at sequence 2^64-1 under a real source's id made every
    later record of that source a duplicate."""
    good = base_record()
    real = "svc-a/123-abcdef012345"
    send(sidecar.address, [batch(real, [good, good, good])])  # watermark 3
    forged = telemetry_pb2.ReportRequest(source_id=real, records=[record(2**64 - 1, good)])
    # an absurd drop count cannot buy the jump either
    forged.records.append(record(2**63, good, dropped_before=2**63))
    resp = send(sidecar.address, [forged])
    assert (resp[0].accepted, resp[0].rejected, resp[0].acknowledged_through_sequence) == (0, 2, 3)
    # the real source goes on: sequence 4, then 20 after 15 records it says it dropped
    later = telemetry_pb2.ReportRequest(
        source_id=real, records=[record(4, good), record(20, good, dropped_before=15)]
    )
    resp = send(sidecar.address, [later])
    assert (resp[0].accepted, resp[0].duplicates, resp[0].rejected) == (2, 0, 0)
    samples = scrape(sidecar)
    assert total(samples, REJECTED, reason="sequence_jump") == 1
    assert total(samples, REJECTED, reason="count_out_of_range") == 1
    assert total(samples, "specdec_requests_total") == 5
    assert total(samples, "specdec_sidecar_service_dropped_records_total") == 15


def test_the_jump_bound_is_a_setting():
    s = start("--max-sequence-jump", "10")
    try:
        good = base_record()
        resp = send(
            s.address,
            [
                batch("src", [good]),  # a new source may start anywhere: 1
                telemetry_pb2.ReportRequest(
                    source_id="src",
                    records=[
                        record(12, good),  # 10 ahead of 1 beyond the next: allowed
                        record(24, good),  # 11 beyond 13: rejected
                        record(40, good, dropped_before=20),
                    ],
                ),
            ],
        )  # 15 ahead, 20 declared: allowed
        assert [(r.accepted, r.rejected) for r in resp] == [(1, 0), (2, 1)]
        assert resp[1].acknowledged_through_sequence == 40
    finally:
        s.stop()


def test_a_new_source_starts_at_any_sequence(sidecar):
    """A reporter whose earlier records went to another sidecar (or to this one before a
    restart) starts anywhere: the bound applies from the first record processed."""
    resp = send(sidecar.address, [batch("late-src", [base_record()], start=10**9)])
    assert (resp[0].accepted, resp[0].acknowledged_through_sequence) == (1, 10**9)


def test_a_long_source_id_is_rejected_and_remembered_nowhere(sidecar):
    good = base_record()
    resp = send(sidecar.address, [batch("s" * 100_000, [good, good])])
    assert (resp[0].accepted, resp[0].rejected) == (0, 2)
    assert len(sidecar.sidecar.sources) == 0
    assert total(scrape(sidecar), REJECTED, reason="source_id_too_long") == 2
    resp = send(sidecar.address, [batch("s" * 512, [good])])  # the limit itself is fine
    assert resp[0].accepted == 1


def test_empty_batches_of_invented_sources_cannot_evict_a_real_one():
    """The issue's dedupe bypass: records, then empty batches of invented sources to evict
    their source, then the same records again, counted twice."""
    s = start("--max-sources", "2")
    try:
        rng = random.Random(5)
        records = [simulate_metrics(rng) for _ in range(5)]
        send(s.address, [batch("real", records)])
        send(s.address, [telemetry_pb2.ReportRequest(source_id=f"invented-{i}") for i in range(100)])
        resent = send(s.address, [batch("real", records)])
        assert (resent[0].accepted, resent[0].duplicates) == (0, 5)
        samples = scrape(s)
        assert total(samples, "specdec_requests_total") == 5
        assert total(samples, "specdec_sidecar_sources_evicted_total") == 0
    finally:
        s.stop()


def test_an_empty_batch_answers_with_the_sources_watermark(sidecar):
    send(sidecar.address, [batch("known", [base_record()] * 3)])
    resp = send(
        sidecar.address,
        [telemetry_pb2.ReportRequest(source_id="known"), telemetry_pb2.ReportRequest(source_id="unknown")],
    )
    assert [r.acknowledged_through_sequence for r in resp] == [3, 0]


def test_huge_durations_are_rejected_and_the_histogram_sums_stay_finite(sidecar):
    """The issue's case: 1e308 durations made the latency histograms' sums +Inf."""
    huge = base_record()
    huge.duration_seconds = 1e308
    resp = send(sidecar.address, [batch("timings", [huge, huge, base_record()])])
    assert (resp[0].accepted, resp[0].rejected) == (1, 2)
    samples = scrape(sidecar)
    sums = [
        v for (name, _), v in samples.items() if name.startswith("gen_ai_server_") and name.endswith("_sum")
    ]
    assert sums and all(math.isfinite(v) for v in sums)
    assert total(samples, REJECTED, reason="timing_out_of_range") == 2


def identity_record(rng: random.Random, model: str) -> metrics_pb2.SpeculativeMetrics:
    return simulate_metrics(rng, (model, NONE, "", 0))


def test_invented_identities_cannot_push_real_series_into_the_sdk_overflow():
    """The issue's case: invented identities beyond the SDK's 2,000 attribute sets per
    instrument sent the real service's new series to the label-less overflow series. Now they
    stop at the series budget (--max-series, below the SDK's limit): rejected, counted, and
    the real service's series keep their labels. (A small budget keeps the test fast: a
    scrape of 1,000 identities takes seconds.)"""
    s = start("--max-series", "40", "--max-series-per-source", "20")
    try:
        rng = random.Random(9)
        send(s.address, [batch("real-svc", [identity_record(rng, "real-model")])])
        flood = [
            batch(f"attacker-{i}", [identity_record(rng, f"fake-{i}-{j}") for j in range(30)])
            for i in range(3)
        ]  # 90 identities from 3 sources
        responses = send(s.address, flood)
        assert [r.accepted for r in responses] == [20, 19, 0]  # 39 + real-model
        send(s.address, [batch("real-svc", [identity_record(rng, "real-model")], start=2)])
        samples = scrape(s)
        assert not any("otel_metric_overflow" in dict(ls) for _, ls in samples)
        assert total(samples, "specdec_requests_total", gen_ai_request_model="real-model") == 2
        assert total(samples, REJECTED, reason="source_series_limit") == 10
        assert total(samples, REJECTED, reason="series_limit") == 11 + 30
    finally:
        s.stop()


def test_the_series_budget_stays_below_the_sdk_limit():
    from opentelemetry.sdk.metrics._internal._view_instrument_match import (
        _DEFAULT_CARDINALITY_LIMIT,
    )

    from telemetry.config import ConfigError, SidecarConfig
    from telemetry.series_budget import SDK_CARDINALITY_LIMIT

    assert SDK_CARDINALITY_LIMIT == _DEFAULT_CARDINALITY_LIMIT  # still the SDK's value
    assert (
        SidecarConfig.from_args(["--max-series", str(SDK_CARDINALITY_LIMIT - 1)], environ={}).max_series
        == SDK_CARDINALITY_LIMIT - 1
    )
    with pytest.raises(ConfigError, match="--max-series"):
        SidecarConfig.from_args(["--max-series", str(SDK_CARDINALITY_LIMIT)], environ={})


def test_one_source_adds_at_most_its_part_of_the_budget():
    s = start("--max-series", "100", "--max-series-per-source", "10")
    try:
        rng = random.Random(8)
        resp = send(
            s.address,
            [batch(f"src-{i}", [identity_record(rng, f"m-{i}-{j}") for j in range(12)]) for i in range(3)]
            + [batch("src-0", [identity_record(rng, "m-1-0")], start=13)],
        )
        # src-0 may use an identity another source added, at no cost
        assert [(r.accepted, r.rejected) for r in resp] == [(10, 2), (10, 2), (10, 2), (1, 0)]
        assert total(scrape(s), REJECTED, reason="source_series_limit") == 6
    finally:
        s.stop()


def test_the_series_of_k_count_against_the_budget():
    """An identity costs k + 1 series (draft passes per accepted count, 0..k)."""
    s = start("--max-series", "12", "--max-series-per-source", "12")
    try:
        rng = random.Random(4)
        ids = [(f"m{i}", metrics_pb2.SPECULATION_METHOD_NGRAM, "", 4) for i in range(3)]
        recs = [simulate_metrics(rng, ident) for ident in ids]  # 5 series each
        resp = send(s.address, [batch("k-src", recs + [recs[0]])])
        assert (resp[0].accepted, resp[0].rejected) == (3, 1)  # m2 would make 15
    finally:
        s.stop()


def test_a_large_batch_does_not_hold_up_other_streams(sidecar):
    """The issue's case: one 90k-record batch blocked every other source for 2.6 s. Batches
    are processed in slices with the other streams served in between: a small batch sent
    while the large one is being processed is answered before it."""
    good = base_record()
    big = telemetry_pb2.ReportRequest(source_id="big")
    for seq in range(1, 90_001):
        big.records.add(sequence=seq).metrics.CopyFrom(good)
    order: list[str] = []

    def send_big() -> None:
        send(sidecar.address, [big])
        order.append("big")

    sender = threading.Thread(target=send_big)
    sender.start()
    try:
        table = sidecar.sidecar.sources
        wait_for(
            lambda: table.peek("big") is not None and table.peek("big").processed > 0,
            60,
            interval_s=0.001,
            what="the large batch being processed",
        )
        resp = send(sidecar.address, [batch("small", [good])])
        order.append("small")
        assert resp[0].accepted == 1
    finally:
        sender.join(120)
    assert order == ["small", "big"]
    assert total(scrape(sidecar), "specdec_requests_total") == 90_001


def test_garbage_strings_in_records_are_rejected_by_length(sidecar):
    m = base_record()
    m.request_id = "r" * 1_000_000
    resp = send(sidecar.address, [batch("strings", [m])])
    assert resp[0].rejected == 1
    assert total(scrape(sidecar), REJECTED, reason="string_too_long") == 1


def test_one_stream_registers_a_bounded_number_of_sources_for_pushed_acks(
    otlp_grpc_receiver, sidecar_thread_factory
):
    """In export mode an open stream is remembered under every source it sent a batch for
    (to push their acknowledgements); one stream sending batches of many sources is
    remembered under at most MAX_SOURCES_PER_STREAM of them."""
    import queue

    from telemetry.ingest import MAX_SOURCES_PER_STREAM

    s = sidecar_thread_factory(["--exporters", "otlp"], env=otlp_grpc_receiver.env())
    outbox: queue.Queue = queue.Queue()
    for i in range(50):
        outbox.put(batch(f"many-{i}", [base_record()]))
    with grpc.insecure_channel(s.address) as ch:
        call = telemetry_pb2_grpc.TelemetryServiceStub(ch).Report(iter(outbox.get, None), timeout=30)
        for _ in range(50):
            next(call)
        registered = dict(s.sidecar._ingest._streams)  # the stream is still open
        outbox.put(None)
        list(call)
    assert 0 < len(registered) <= MAX_SOURCES_PER_STREAM


def test_a_reporter_that_never_reads_its_responses_is_no_longer_read(sidecar):
    """Found while hardening: the answers to a stream's batches waited in an unbounded queue
    while the client did not read them, so a client sending empty batches without reading
    grew the sidecar's memory without end (31,000 queued after 10 s). Now a stream stops
    being read after MAX_UNSENT_RESPONSES unwritten answers; gRPC's flow control then holds
    the client back."""
    from telemetry.ingest import MAX_UNSENT_RESPONSES

    raw = telemetry_pb2.ReportRequest(source_id="never-reads").SerializeToString()
    sent = 0

    def batches():
        nonlocal sent
        for _ in range(40_000):
            sent += 1
            yield raw

    ingest = sidecar.sidecar._ingest
    # no BDP probing: the client's receive window stays small, so the server's writes block
    # early (as they would, later, with any window)
    with grpc.insecure_channel(sidecar.address, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        call = ch.stream_stream(
            "/specdec.v1.TelemetryService/Report", request_serializer=None, response_deserializer=None
        )(batches(), timeout=60)
        peak = 0
        wait_for(
            lambda: sent >= 40_000 or ingest.queued_responses() >= MAX_UNSENT_RESPONSES,
            60,
            what="the answers' queue to fill",
        )
        for _ in range(20):  # the client goes on sending meanwhile
            peak = max(peak, ingest.queued_responses())
            time.sleep(0.05)
        call.cancel()
    assert peak <= MAX_UNSENT_RESPONSES


def test_records_whose_aggregation_fails_are_answered_as_rejected(sidecar):
    """A failure inside the aggregation (a bug, injected here) counts the batch's valid records
    as internal_error, and the answer says rejected, not accepted."""
    aggregator = sidecar.sidecar.aggregator

    def broken_commit(batch) -> None:
        raise RuntimeError("injected aggregation failure")

    aggregator.commit = broken_commit
    rng = random.Random(11)
    responses = send(sidecar.address, [batch("broken/1", [simulate_metrics(rng) for _ in range(3)])])
    assert (responses[-1].accepted, responses[-1].rejected) == (0, 3)
    assert total(scrape(sidecar), REJECTED, reason="internal_error") == 3


def test_a_stopping_sidecar_ends_a_large_batch_at_a_slice_boundary(sidecar):
    """Once the sidecar stops, a batch in progress is not aggregated further: a slice counted
    after the final export would be acknowledged (ack mode aggregate) and never exported.
    The answer acknowledges exactly the slices processed; the reporter resends the rest."""
    ingestor = sidecar.sidecar.ingestor
    rng = random.Random(12)
    n = 3 * SLICE_RECORDS
    steps = ingestor.steps(batch("stop/1", [simulate_metrics(rng) for _ in range(n)]))
    next(steps)  # the first slice is processed; the generator waits at the boundary
    TelemetryIngest(ingestor).stop_accepting()  # what Sidecar.stop does first
    with pytest.raises(StopIteration) as done:
        next(steps)
    response = done.value.value
    assert (response.accepted, response.acknowledged_through_sequence) == (SLICE_RECORDS, SLICE_RECORDS)
    assert ingestor.sources.peek("stop/1").processed == SLICE_RECORDS
