"""OTLP export (gRPC and HTTP) into receivers built from opentelemetry-proto: exact counters
after 1,000 random records from three reporters, histograms, window ratios, resource,
self-metrics, and acknowledgement only after a successful export."""

from __future__ import annotations

import random
import time

import pytest

from service.reporting import MetricsReporter
from telemetry.aggregation import (
    ACCEPT_RATE_BUCKETS,
    DURATION_BUCKETS,
    SEMCONV_TPOT_BUCKETS,
    SEMCONV_TTFT_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    accept_length_buckets,
)
from telemetry.validation import REASONS
from tests.telemetry.support import (
    IDENTITIES,
    attrs_of,
    expected_totals,
    identity_attrs,
    isclose,
    simulate_metrics,
    wait_for,
)

N_RECORDS = 1000


def start_reporters(address: str, n: int = 3, **kw) -> list[MetricsReporter]:
    return [MetricsReporter(address, instance_id=f"svc-{i}", **kw).start() for i in range(n)]


def test_exact_sums_and_ratios_over_otlp(otlp_receiver, sidecar_thread_factory):
    sc = sidecar_thread_factory(
        ["--exporters", "otlp", "--instance-id", "sidecar-under-test"],
        env={
            **otlp_receiver.env(),
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_SERVICE_NAME": "sidecar-svc",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        },
    )
    assert sc.config.otlp_protocol == otlp_receiver.protocol
    assert sc.config.ack_mode == "export"
    reporters = start_reporters(sc.address)
    rng = random.Random(2024)
    records = []
    for i in range(N_RECORDS):
        m = simulate_metrics(rng, instance_id=f"svc-{i % 3}")
        records.append(m)
        reporters[i % 3].report(m)
    # flush() returns once every record is acknowledged, i.e. included in a successful export
    assert all(r.flush(30) for r in reporters), [r.stats for r in reporters]
    for r in reporters:
        assert r.stats.acked == r.stats.last_sequence and r.stats.dropped == 0
        r.stop(1)

    store = otlp_receiver.store
    got = store.counter_totals()
    exp = expected_totals(records)
    for key, value in exp.items():
        if "#" not in key[0]:
            assert got.get(key) == value, (key, got.get(key), value)
    # nothing else in the speculative counters (no stray series)
    spec = {
        k: v
        for k, v in got.items()
        if k[0].startswith("specdec.") and not k[0].startswith("specdec.sidecar.")
    }
    assert {k for k, v in spec.items() if v} == {k for k, v in exp.items() if "#" not in k[0] and v}

    # fleet ratios: ratio of the summed counters, per identity and overall
    acc = sum(v for (n, _), v in got.items() if n == "specdec.accepted_drafts")
    prop = sum(v for (n, _), v in got.items() if n == "specdec.proposed_drafts")
    assert acc == sum(m.accepted_drafts for m in records)
    assert prop == sum(m.proposed_drafts for m in records)

    # window gauges (window 60 s > test duration): ratios of sums, not means of ratios
    gauges = store.gauges()
    for ident in IDENTITIES:
        a = identity_attrs(*ident)
        mine = [m for m in records if attrs_of(m) == a]
        p = sum(m.proposed_drafts for m in mine)
        ac = sum(m.accepted_drafts for m in mine)
        v = sum(m.verify_passes for m in mine)
        if p:
            assert isclose(gauges[("specdec.window.accept_rate", a)], ac / p)
            mean_of_ratios = sum(m.accept_rate for m in mine if m.HasField("accept_rate")) / sum(
                1 for m in mine if m.HasField("accept_rate")
            )
            assert not isclose(mean_of_ratios, ac / p, rel=1e-6)  # the test can tell them apart
        else:
            assert ("specdec.window.accept_rate", a) not in gauges  # 0/0 is absent, not 0
        assert isclose(gauges[("specdec.window.accept_length", a)], (ac + v) / v)

    # histograms: one observation per request, with the View's bucket boundaries
    hists = store.histogram_totals()
    bounds = {
        "specdec.request.accept_rate": ACCEPT_RATE_BUCKETS,
        "specdec.request.accept_length": accept_length_buckets(64),
        "gen_ai.server.time_to_first_token": TTFT_BUCKETS,
        "gen_ai.server.time_per_output_token": TPOT_BUCKETS,
        "gen_ai.server.request.duration": DURATION_BUCKETS,
    }
    for (name, _attrs), (count, _total, buckets, b) in hists.items():
        assert b == tuple(bounds[name]), name
        assert sum(buckets) == count
    for key, value in exp.items():
        if "#count" in key[0]:
            name = key[0].split("#")[0]
            assert hists[(name, key[1])][0] == value, key
    dur_sum = sum(t for (n, _), (_, t, _, _) in hists.items() if n == "gen_ai.server.request.duration")
    assert isclose(dur_sum, sum(m.duration_seconds for m in records), rel=1e-9)

    # self-metrics
    assert got[("specdec.sidecar.records.received", frozenset())] == N_RECORDS
    assert got[("specdec.sidecar.records.aggregated", frozenset())] == N_RECORDS
    assert got[("specdec.sidecar.records.duplicate", frozenset())] == 0
    assert got[("specdec.sidecar.service_dropped_records", frozenset())] == 0
    assert not any(n == "specdec.sidecar.records.rejected" and v for (n, _), v in got.items())
    # ... but every reason's series and the exporter's failure series exist, at 0
    assert {dict(a)["reason"] for (n, a) in got if n == "specdec.sidecar.records.rejected"} == set(REASONS)
    assert got[("specdec.sidecar.export.failures", frozenset({("exporter", "otlp")}))] == 0

    # resource: the sidecar's own instance id; service ids are not point attributes
    res = store.resources()[-1]
    assert res["service.instance.id"] == "sidecar-under-test"
    assert res["service.name"] == "sidecar-svc"
    assert res["deployment.environment.name"] == "test"
    for _, metric, _, p in store.points():
        keys = {kv.key for kv in p.attributes}
        assert "service.instance.id" not in keys and "instance_id" not in keys
        if metric.name.startswith(("specdec.request", "specdec.window", "gen_ai.")) or metric.name in (
            "specdec.requests",
            "specdec.accepted_drafts",
        ):
            assert {
                "gen_ai.request.model",
                "specdec.method",
                "specdec.draft_model",
                "specdec.num_draft_tokens",
            } <= keys, metric.name
    sc.stop()


def test_no_ack_until_export_succeeds_and_failures_counted(otlp_grpc_receiver, sidecar_thread_factory):
    otlp_grpc_receiver.failing = True
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"],
        # the exporter retries a failing export for OTEL_EXPORTER_OTLP_TIMEOUT (seconds in
        # this exporter version)
        env={
            **otlp_grpc_receiver.env(),
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
    )
    reporter = MetricsReporter(sc.address, instance_id="svc").start()
    rng = random.Random(5)
    records = [simulate_metrics(rng) for _ in range(50)]
    for m in records:
        reporter.report(m)
    assert not reporter.flush(1.5)  # exports fail: nothing may be acknowledged
    st = reporter.stats
    assert st.acked == 0 and st.pending == 50 and st.in_flight == 50
    wait_for(lambda: sc.sidecar.export.otlp_reader.exports_failed >= 1, 10, what="a failure")
    assert reporter.stats.acked == 0
    otlp_grpc_receiver.failing = False
    assert reporter.flush(10)
    reporter.stop(1)
    got = otlp_grpc_receiver.store.counter_totals()
    failures = sum(v for (n, _), v in got.items() if n == "specdec.sidecar.export.failures")
    assert failures >= 1
    assert sum(v for (n, _), v in got.items() if n == "specdec.requests") == 50
    exp = expected_totals(records)
    assert all(got.get(k) == v for k, v in exp.items() if "#" not in k[0])


def test_final_export_on_stop(otlp_grpc_receiver, sidecar_thread_factory):
    sc = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    )
    reporter = MetricsReporter(sc.address, instance_id="svc").start()
    rng = random.Random(6)
    records = [simulate_metrics(rng) for _ in range(40)]
    for m in records:
        reporter.report(m)
    wait_for(
        lambda: (
            reporter.stats.in_flight == 40
            and sc.sidecar.sources.peek(reporter.source_id)
            and sc.sidecar.sources.peek(reporter.source_id).processed == 40
        ),
        10,
        what="records processed",
    )
    assert reporter.stats.acked == 0  # interval is 10 minutes: no export yet
    t0 = time.monotonic()
    sc.stop()  # graceful: final export, whose acks reach the reporter before the stream ends
    assert time.monotonic() - t0 < 10
    got = otlp_grpc_receiver.store.counter_totals()
    assert sum(v for (n, _), v in got.items() if n == "specdec.requests") == 40
    wait_for(lambda: reporter.stats.acked == 40, 5, what="acks from the final export")
    reporter.stop(0.1)


def _gpu_speed_record(rng: random.Random, ttft: float, tpot: float):
    """A successful record whose tokens came at GPU speed: ttft, then one token per tpot."""
    m = simulate_metrics(rng, identity=IDENTITIES[0], passes=10)
    m.finish_reason = 1  # EOS: latency histograms take successful requests only
    m.completion_tokens = 11
    m.queue_time_seconds = ttft / 2
    m.time_to_first_token_seconds = ttft
    m.duration_seconds = ttft + 10 * tpot
    return m


@pytest.mark.parametrize(
    "argv, env, ttft_bounds, tpot_bounds",
    [
        ([], {}, TTFT_BUCKETS, TPOT_BUCKETS),
        (
            ["--tpot-buckets", "0.001,0.002,0.003,0.005,0.008"],
            {"SPECDEC_SIDECAR_TTFT_BUCKETS": "0.0005,0.002,0.01,0.05"},
            (0.0005, 0.002, 0.01, 0.05),
            (0.001, 0.002, 0.003, 0.005, 0.008),
        ),
    ],
)
def test_latency_buckets_resolve_gpu_token_times(
    otlp_grpc_receiver, sidecar_thread_factory, argv, env, ttft_bounds, tpot_bounds
):
    """The conventions' recommended buckets would put all four times per output token in
    their first bucket (and two of the times to first token); the sidecar's, default or
    configured, separate them, through the SDK's Views and the real OTLP export."""
    ttfts, tpots = (0.0003, 0.0012, 0.0035, 0.025), (0.0011, 0.0023, 0.0036, 0.0055)
    assert max(tpots) < SEMCONV_TPOT_BUCKETS[0] and min(ttfts) < SEMCONV_TTFT_BUCKETS[0]
    sc = sidecar_thread_factory(
        ["--exporters", "otlp", *argv],
        env={**otlp_grpc_receiver.env(), **env, "OTEL_METRIC_EXPORT_INTERVAL": "200"},
    )
    assert (sc.config.ttft_buckets, sc.config.tpot_buckets) == (ttft_bounds, tpot_bounds)
    reporter = start_reporters(sc.address, n=1)[0]
    rng = random.Random(7)
    for ttft, tpot in zip(ttfts, tpots):
        reporter.report(_gpu_speed_record(rng, ttft, tpot))
    assert reporter.flush(30)
    reporter.stop(1)
    hists = otlp_grpc_receiver.store.histogram_totals()

    def buckets_of(name: str, bounds: tuple) -> list[int]:
        ((count, _, buckets, exported),) = [v for (n, _), v in hists.items() if n == name]
        assert exported == bounds and count == 4
        return buckets

    for name, bounds, values in (
        ("gen_ai.server.time_to_first_token", ttft_bounds, ttfts),
        ("gen_ai.server.time_per_output_token", tpot_bounds, tpots),
    ):
        buckets = buckets_of(name, bounds)
        # Each value in the bucket (lower, upper] the boundaries give it: four apart.
        want = [0] * (len(bounds) + 1)
        for v in values:
            want[sum(1 for b in bounds if b < v)] += 1
        assert buckets == want, (name, buckets)
        assert max(buckets) == 1  # resolved: no two requests share a bucket
    sc.stop()
