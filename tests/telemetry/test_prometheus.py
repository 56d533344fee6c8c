"""A real Prometheus server scrapes the sidecar's embedded endpoint; PromQL over the scraped
counters gives the fleet acceptance rate and length as ratios of sums."""

from __future__ import annotations

import random
import time

from service.reporting import MetricsReporter
from tests.telemetry.support import free_port, isclose, simulate_metrics, wait_for


def test_promql_acceptance_rate_over_scraped_counters(prometheus_server, sidecar_process_factory):
    port = free_port()
    sidecar = sidecar_process_factory(["--exporters", "prometheus"], prometheus_port=port)
    prometheus_server.set_targets([sidecar.prometheus_address])
    reporters = [MetricsReporter(sidecar.address, instance_id=f"svc-{i}").start() for i in range(2)]
    rng = random.Random(77)
    records = [simulate_metrics(rng) for _ in range(400)]
    # two phases, each scraped, so that a windowed increase() has samples to work with
    for n, phase in ((200, records[:200]), (400, records[200:])):
        for i, m in enumerate(phase):
            reporters[i % 2].report(m)
        assert all(r.flush(15) for r in reporters)
        wait_for(
            lambda: prometheus_server.scalar("sum(specdec_requests_total)") == n,  # noqa: B023
            45,
            0.25,
            f"Prometheus to scrape {n} records",
        )
        time.sleep(2.5)  # a couple more scrapes at this value
    for r in reporters:
        r.stop(1)
    accepted = sum(m.accepted_drafts for m in records)
    proposed = sum(m.proposed_drafts for m in records)
    verify = sum(m.verify_passes for m in records)

    rate = prometheus_server.scalar("sum(specdec_accepted_drafts_total) / sum(specdec_proposed_drafts_total)")
    assert isclose(rate, accepted / proposed), (rate, accepted / proposed)
    length = prometheus_server.scalar(
        "(sum(specdec_accepted_drafts_total) + sum(specdec_verify_passes_total))"
        " / sum(specdec_verify_passes_total)"
    )
    assert isclose(length, (accepted + verify) / verify)
    # the documented windowed form: a ratio of increases over the same range and samples
    windowed = prometheus_server.scalar(
        "sum(increase(specdec_accepted_drafts_total[5m])) / sum(increase(specdec_proposed_drafts_total[5m]))"
    )
    second = records[200:]
    exact = sum(m.accepted_drafts for m in second) / sum(m.proposed_drafts for m in second)
    # increase() extrapolates both series by (nearly) the same factor: close, not exact
    assert windowed is not None and isclose(windowed, exact, rel=0.05), (windowed, exact)
    # per-model breakdown sums back to the fleet value
    by_model = prometheus_server.query("sum by (gen_ai_request_model) (specdec_proposed_drafts_total)")
    assert sum(float(r["value"][1]) for r in by_model) == proposed
    prometheus_server.set_targets([])
