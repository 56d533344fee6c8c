"""Bounded, seeded fuzzing of both request paths (testkit/fuzz.py): the service's
Generate with a tiny random model and the sidecar's Report, over real gRPC. Every case must
be answered with an allowed status (never INTERNAL or UNKNOWN), within its deadline, the
server must go on serving, and its memory must stay bounded. A few tens of seconds on two
cores; bench/fuzz_requests.py runs the same cases longer."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.fuzz import fuzz_generate, fuzz_report, rss_bytes
from tests.service.test_generate import collect, request
from tests.telemetry.mutations import base_record
from tests.telemetry.support import SidecarThread
from tests.telemetry.test_ingest import batch, send

SEED = 20  # issue 20; any seed must pass
MEMORY_GROWTH_LIMIT = 300 << 20  # the process holds torch and the model: allocator noise


def test_generate_survives_hostile_requests(run_service, make_stub) -> None:
    service = run_service()
    stub = make_stub(service.address)
    collect(stub, request(max_tokens=2))  # warm: first-call allocations are not growth
    rss_before = rss_bytes()
    run = fuzz_generate(service.address, SEED, max_cases=300, budget_s=25, deadline_s=3)
    summary = run.summary()
    assert not run.findings, summary
    assert run.cases >= 60, summary  # the budget ran out long before the cases did: too slow
    assert summary["codes"].get("INVALID_ARGUMENT", 0) > 0 and summary["codes"].get("OK", 0) > 0
    _, final, _ = collect(stub, request(max_tokens=4), timeout=60)  # still serving
    assert final.completion_tokens == 4
    assert rss_bytes() - rss_before < MEMORY_GROWTH_LIMIT, summary


def self_metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics") as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name.startswith("specdec_sidecar_records_"):
                key = sample.name
                if sample.labels.get("reason") == "malformed_batch":
                    key += "{malformed_batch}"  # counted per batch, not per record
                out[key] = out.get(key, 0) + sample.value
    return out


@pytest.fixture
def sidecar():
    s = SidecarThread(
        ["--listen", "127.0.0.1:0", "--exporters", "prometheus", "--prometheus-address", "127.0.0.1:0"]
    )
    yield s
    s.stop()


def test_report_survives_hostile_batches(sidecar) -> None:
    rss_before = rss_bytes()
    run = fuzz_report(sidecar.address, SEED, max_streams=150, budget_s=20)
    summary = run.summary()
    assert not run.findings, summary
    assert run.cases >= 40, summary
    assert summary["codes"].get("INVALID_ARGUMENT", 0) > 0 and summary["codes"].get("OK", 0) > 0
    m = self_metrics(sidecar.sidecar.prometheus_address)
    assert m["specdec_sidecar_records_aggregated_total"] > 100, m  # the valid paths were reached
    # still serving, and every record is accounted for: received = aggregated + rejected +
    # duplicate (malformed batches are counted per batch, apart)
    # (the fuzz's identities may have used up the series budget: a new one is then rejected)
    after = send(sidecar.address, [batch("after-fuzz", [base_record()])])[0]
    assert after.accepted + after.rejected == 1 and after.acknowledged_through_sequence == 1
    m = self_metrics(sidecar.sidecar.prometheus_address)
    assert (
        m["specdec_sidecar_records_received_total"]
        == m["specdec_sidecar_records_aggregated_total"]
        + m["specdec_sidecar_records_rejected_total"]
        + m["specdec_sidecar_records_duplicate_total"]
    ), m
    assert sidecar.sidecar.sources.approximate_bytes <= sidecar.config.max_source_bytes
    assert rss_bytes() - rss_before < MEMORY_GROWTH_LIMIT, summary
