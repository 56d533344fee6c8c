"""Counters stay integers end to end (issue 20, item 12): past 2^53, where a float64 cannot
tell n from n + 1, the OTLP export still carries the exact sum (NumberDataPoint.as_int).
The Prometheus text format is float64 by definition, so its scrape endpoint cannot."""

from __future__ import annotations

import random

from service.reporting import MetricsReporter
from tests.telemetry.support import IDENTITIES, attrs_of, simulate_metrics, wait_for

HUGE = 1 << 40  # the largest per-record count the sidecar accepts (telemetry/validation.py)


def test_a_plus_one_past_two_to_the_53_is_exported_exactly(otlp_grpc_receiver, sidecar_thread_factory):
    sidecar = sidecar_thread_factory(
        ["--exporters", "otlp"], env={**otlp_grpc_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": "500"}
    )
    reporter = MetricsReporter(sidecar.address, instance_id="svc").start()
    rng = random.Random(5)
    n = (1 << 53) // HUGE + 1
    try:
        for i in range(n + 1):
            m = simulate_metrics(rng, IDENTITIES[3])
            m.prompt_tokens = HUGE if i < n else 1
            reporter.report(m)
        assert reporter.flush(60), reporter.stats
    finally:
        reporter.stop(1)
    want = n * HUGE + 1
    assert float(want) == float(want - 1)  # a float64 counter would lose the +1
    key = attrs_of(m)

    def exported():
        points = [
            p
            for _, metric, _, p in otlp_grpc_receiver.store.points()
            if metric.name == "specdec.prompt_tokens"
            and frozenset((kv.key, getattr(kv.value, kv.value.WhichOneof("value"))) for kv in p.attributes)
            == key
        ]
        return points and points[-1].WhichOneof("value") == "as_int" and points[-1].as_int == want

    wait_for(exported, 20, 0.1, f"specdec.prompt_tokens == {want} as an integer")
