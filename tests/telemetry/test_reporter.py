"""The service-side MetricsReporter against real (in-process) sidecars over loopback gRPC:
wire encoding, resend after a broken stream, late sidecar, buffer overflow, non-blocking."""

from __future__ import annotations

import random
import socket
import threading
import time

from service.reporting import MetricsReporter, encode_report_request
from specdec.v1 import telemetry_pb2
from tests.telemetry.support import (
    TcpProxy,
    expected_totals,
    free_port,
    simulate_metrics,
    wait_for,
)


def counters(receiver) -> dict:
    return receiver.store.counter_totals()


def assert_exact(got: dict, records) -> None:
    exp = expected_totals(records)
    bad = {k: (got.get(k), v) for k, v in exp.items() if "#" not in k[0] and got.get(k) != v}
    assert not bad, bad


def test_hand_framed_request_equals_generated_message():
    rng = random.Random(1)
    recs = [simulate_metrics(rng) for _ in range(5)]
    drops = [0, 1, 0, 2**40 + 3, 127]
    traces = [
        telemetry_pb2.RequestTrace(
            trace_id=bytes(range(1, 17)), span_id=bytes(range(8)), operation_name="chat", top_k=i
        )
        if i % 2
        else None
        for i in range(5)
    ]
    raw = encode_report_request(
        b"svc/1-abc",
        [
            (i + 300, m.SerializeToString(), drops[i], traces[i].SerializeToString() if traces[i] else b"")
            for i, m in enumerate(recs)
        ],
    )
    expected = telemetry_pb2.ReportRequest(source_id="svc/1-abc")
    for i, m in enumerate(recs):
        record = expected.records.add(sequence=i + 300, dropped_before=drops[i])
        record.metrics.CopyFrom(m)
        if traces[i]:
            record.trace.CopyFrom(traces[i])
    assert telemetry_pb2.ReportRequest.FromString(raw) == expected
    assert telemetry_pb2.ReportRequest.FromString(
        encode_report_request(b"s", [])
    ) == telemetry_pb2.ReportRequest(source_id="s")


def test_resend_after_stream_breaks_counts_once(otlp_grpc_receiver, sidecar_thread_factory):
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "700"}
    )
    proxy = TcpProxy(sc.address)
    reporter = MetricsReporter(
        proxy.address, instance_id="svc", batch_size=16, backoff_initial_s=0.05
    ).start()
    rng = random.Random(3)
    records = []
    try:
        for _round in range(4):
            for _ in range(60):
                m = simulate_metrics(rng)
                records.append(m)
                reporter.report(m)
            # wait until the sidecar has processed (not yet exported) this round, then cut
            wait_for(
                lambda: (
                    (s := sc.sidecar.sources.peek(reporter.source_id)) is not None
                    and s.processed == len(records)
                ),
                10,
                what="records processed",
            )
            assert proxy.cut() > 0
            time.sleep(0.1)
        assert reporter.flush(20), reporter.stats
        st = reporter.stats
        assert st.reconnects >= 3 and st.dropped == 0
        assert st.sent > len(records)  # unacknowledged records went out again
    finally:
        reporter.stop(1)
        proxy.close()
    got = counters(otlp_grpc_receiver)
    assert got[("specdec.sidecar.records.duplicate", frozenset())] > 0
    assert got[("specdec.sidecar.records.aggregated", frozenset())] == len(records)
    assert_exact(got, records)


def test_sidecar_absent_at_start_records_arrive_later(otlp_grpc_receiver, sidecar_thread_factory):
    port = free_port()
    reporter = MetricsReporter(
        f"127.0.0.1:{port}", instance_id="svc", backoff_initial_s=0.05, backoff_max_s=0.5
    ).start()
    rng = random.Random(4)
    records = [simulate_metrics(rng) for _ in range(120)]
    for m in records:
        reporter.report(m)
    time.sleep(1.0)
    st = reporter.stats
    assert st.acked == 0 and st.pending == 120 and st.reconnects >= 1
    sidecar_thread_factory(
        ["--exporters", "otlp", "--listen", f"127.0.0.1:{port}"],
        env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"},
    )
    assert reporter.flush(15), reporter.stats
    reporter.stop(1)
    assert_exact(counters(otlp_grpc_receiver), records)


def test_buffer_overflow_drops_oldest_and_reports_the_count(otlp_grpc_receiver, sidecar_thread_factory):
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    )
    reporter = MetricsReporter(sc.address, instance_id="svc", buffer_size=100)
    rng = random.Random(5)
    records = [simulate_metrics(rng) for _ in range(250)]
    for m in records:  # not started yet: nothing can be sent, the buffer overflows
        reporter.report(m)
    assert reporter.stats.dropped == 150 and reporter.stats.pending == 100
    # the 150 drops ride on the oldest kept record (sequence 151, the first one after the gap)
    assert [(seq, n) for seq, _, n, _ in reporter._pending][:2] == [(151, 150), (152, 0)]
    reporter.start()
    assert reporter.flush(15)
    reporter.stop(1)
    got = counters(otlp_grpc_receiver)
    assert_exact(got, records[150:])  # the oldest 150 were dropped, the newest 100 counted
    assert got[("specdec.sidecar.service_dropped_records", frozenset())] == 150


def test_drops_keep_in_flight_records(otlp_grpc_receiver, sidecar_thread_factory):
    """Full buffer while records are in flight (sidecar never exports): the in-flight ones
    stay (they may be resent), newer never-sent ones are dropped."""
    otlp_grpc_receiver.failing = True
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"],
        env={
            **otlp_grpc_receiver.env(),
            "OTEL_METRIC_EXPORT_INTERVAL": "100000",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
    )
    reporter = MetricsReporter(sc.address, instance_id="svc", buffer_size=50, batch_size=10).start()
    rng = random.Random(6)
    first = [simulate_metrics(rng) for _ in range(40)]
    for m in first:
        reporter.report(m)
    wait_for(lambda: reporter.stats.in_flight == 40, 10, what="40 in flight")
    for _ in range(30):
        reporter.report(simulate_metrics(rng))
    st = reporter.stats
    assert st.in_flight == 40 and st.pending == 50 and st.dropped == 20
    # sequences 41..60 were dropped: their count rides on 61, the oldest kept unsent record
    assert [(seq, n) for seq, _, n, _ in reporter._pending][:2] == [(61, 20), (62, 0)]
    reporter.stop(0.1)


def test_drops_with_nothing_unsent_ride_on_the_next_record(otlp_grpc_receiver, sidecar_thread_factory):
    """Everything buffered is in flight (exports fail, so nothing is acknowledged): each new
    record is itself dropped and its count carried to the next record reported, which the
    sidecar counts once the exports succeed again."""
    otlp_grpc_receiver.failing = True
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"],
        env={
            **otlp_grpc_receiver.env(),
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
    )
    reporter = MetricsReporter(
        sc.address, instance_id="svc", buffer_size=20, batch_size=10, linger_s=0.01
    ).start()
    rng = random.Random(8)
    kept = [simulate_metrics(rng) for _ in range(20)]
    for m in kept:
        reporter.report(m)
    wait_for(lambda: reporter.stats.in_flight == 20, 10, what="20 in flight")
    for _ in range(7):
        reporter.report(simulate_metrics(rng))  # dropped at once: nothing unsent to drop
    st = reporter.stats
    assert st.dropped == 7 and st.pending == 20 and not reporter._pending
    otlp_grpc_receiver.failing = False
    wait_for(lambda: reporter.stats.in_flight == 0, 15, what="acknowledgements")
    last = simulate_metrics(rng)
    reporter.report(last)  # sequence 28 carries the 7 drops (21..27)
    assert [(seq, n) for seq, _, n, _ in reporter._pending] == [(28, 7)]
    assert reporter.flush(15)
    reporter.stop(1)
    got = counters(otlp_grpc_receiver)
    assert got[("specdec.sidecar.service_dropped_records", frozenset())] == 7
    assert_exact(got, kept + [last])


def test_batches_stay_under_the_byte_cap_and_an_oversized_record_is_dropped(
    otlp_grpc_receiver, sidecar_thread_factory
):
    """Records of ~1 MB (a long request id) buffered while the sidecar was away: one batch
    of all of them (20 MB) is over the sidecar's 16 MiB message limit and would be refused,
    and resent, forever. Batches of at most max_batch_bytes get through; a record larger
    than that is dropped when reported and counted on the next record."""
    rng = random.Random(9)
    big = [simulate_metrics(rng, request_id=f"{i}-" + "x" * 1_000_000) for i in range(20)]
    too_big = simulate_metrics(rng, request_id="y" * 5_000_000)
    small = [simulate_metrics(rng) for _ in range(5)]
    reporter = MetricsReporter("127.0.0.1:1", instance_id="svc")  # not started: all buffered
    for m in big:
        reporter.report(m)
    reporter.report(too_big)
    for m in small:
        reporter.report(m)
    assert reporter.stats.dropped == 1 and reporter.stats.pending == 25
    # the oversized record got no sequence number: its drop rides on the record after it
    assert [(seq, n) for seq, _, n, _ in reporter._pending][19:21] == [(20, 0), (21, 1)]
    batch = reporter._take(reporter._pending.copy())
    assert len(batch) == 4 and sum(len(data) for _, data, _, _ in batch) <= reporter.max_batch_bytes

    sc = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    )
    reporter.target = sc.address
    reporter.start()
    assert reporter.flush(30), reporter.stats
    st = reporter.stats
    assert st.reconnects == 0 and st.acked == 25
    reporter.stop(1)
    got = counters(otlp_grpc_receiver)
    # delivered and acknowledged; the sidecar rejects the 1 MB request ids (a service's are
    # at most 128 characters) and counts the rest
    assert_exact(got, small)
    assert got[("specdec.sidecar.records.rejected", frozenset({("reason", "string_too_long")}))] == 20
    assert got[("specdec.sidecar.service_dropped_records", frozenset())] == 1


def test_report_never_blocks_on_a_black_hole():
    """A peer that accepts TCP but never speaks HTTP/2: report() stays O(1)."""
    hole = socket.create_server(("127.0.0.1", 0))
    port = hole.getsockname()[1]
    reporter = MetricsReporter(f"127.0.0.1:{port}", instance_id="svc", buffer_size=1000).start()
    rng = random.Random(7)
    msgs = [simulate_metrics(rng) for _ in range(200)]
    worst = 0.0
    for i in range(20000):
        t0 = time.perf_counter()
        reporter.report(msgs[i % 200])
        worst = max(worst, time.perf_counter() - t0)
    assert reporter.stats.dropped == 19000
    # A report() that waited on the peer would wait for ever: the hole never answers. Any
    # finite bound well above scheduler hiccups on a loaded 2-core box tells the two apart;
    # how fast report() is belongs to bench/diagnostics/reporter_overhead.py, not to a test.
    assert worst < 1.0, worst
    t0 = time.monotonic()
    assert not reporter.stop(0.5)
    assert time.monotonic() - t0 < 7
    hole.close()


def test_report_is_thread_safe(otlp_grpc_receiver, sidecar_thread_factory):
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    )
    reporter = MetricsReporter(sc.address, instance_id="svc").start()
    per_thread = [[simulate_metrics(random.Random(t * 100 + i)) for i in range(150)] for t in range(4)]

    def work(ms):
        for m in ms:
            reporter.report(m)

    threads = [threading.Thread(target=work, args=(ms,)) for ms in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reporter.flush(15)
    reporter.stop(1)
    assert reporter.stats.last_sequence == 600
    assert_exact(counters(otlp_grpc_receiver), [m for ms in per_thread for m in ms])
