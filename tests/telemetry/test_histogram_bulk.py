"""record_many must export exactly what per-value Histogram.record() calls export.

Two MeterProviders with the sidecar's Views and exemplar filter: one fed value by value
through the public API, one through BulkHistograms. Each has a cumulative and a delta
reader (two readers: every reader storage must get the values), collected between
batches. Every data point (attributes, count, sum, min, max, bucket counts) must match.
"""

from __future__ import annotations

import logging
import math
import random

import pytest
import structlog
import structlog.testing
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from telemetry import histogram_bulk
from telemetry.aggregation import REQUEST_ACCEPT_RATE, TTFT, views
from telemetry.histogram_bulk import BulkHistograms

DELTA = {SdkHistogram: AggregationTemporality.DELTA}


def _provider(exemplar_filter=None):
    readers = [InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)]
    provider = MeterProvider(
        metric_readers=readers, views=views(8), exemplar_filter=exemplar_filter or AlwaysOffExemplarFilter()
    )
    meter = provider.get_meter("t")
    hists = (
        meter.create_histogram(REQUEST_ACCEPT_RATE),
        meter.create_histogram(TTFT),
        meter.create_histogram("no.view"),
    )  # default buckets
    return provider, readers, hists


def _points(reader, exemplars: list | None = None):
    """One collection's points; their exemplars go to `exemplars` when given."""
    data = reader.get_metrics_data()
    out = {}
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    if exemplars is not None:
                        exemplars.extend(p.exemplars)
                    key = (metric.name, tuple(sorted(p.attributes.items())))
                    out[key] = (
                        p.count,
                        p.sum,
                        p.min,
                        p.max,
                        tuple(p.bucket_counts),
                        tuple(p.explicit_bounds),
                    )
    return out


def _batches(rng, n_batches):
    identities = [
        {
            "gen_ai.request.model": "m",
            "specdec.method": meth,
            "specdec.draft_model": "",
            "specdec.num_draft_tokens": k,
        }
        for meth, k in (("ngram", 4), ("ngram", 2), ("none", 0))
    ]
    for _ in range(n_batches):
        batch = []
        for attrs in rng.sample(identities, rng.randint(1, len(identities))):
            values = [
                rng.choice((rng.random(), rng.random() * 3, 0.0, 1.0, 0.05))
                for _ in range(rng.randint(1, 40))
            ]
            batch.append((attrs, values))
        yield batch


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        (ca, sa, mina, maxa, ba, ea), (cb, sb, minb, maxb, bb, eb) = a[key], b[key]
        assert (ca, mina, maxa, ba, ea) == (cb, minb, maxb, bb, eb), key
        assert math.isclose(sa, sb, rel_tol=1e-12, abs_tol=1e-12), key  # same adds, same order


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exemplar_filter", [AlwaysOffExemplarFilter, TraceBasedExemplarFilter])
def test_bulk_equals_per_value_record_on_cumulative_and_delta_readers(seed, exemplar_filter):
    """Trace-based: the sidecar's filter with --tracing on; values recorded outside a span's
    context get no exemplar either way."""
    _, ref_readers, ref_h = _provider(exemplar_filter())
    _, bulk_readers, bulk_h = _provider(exemplar_filter())
    bulk = BulkHistograms(bulk_h)
    assert all(bulk.is_bulk(h) for h in bulk_h)
    rng = random.Random(seed)
    for i, batch in enumerate(_batches(rng, 13)):  # the last one after the last mid-stream collect
        for attrs, values in batch:
            for h_ref, h_bulk in zip(ref_h, bulk_h):
                for v in values:
                    h_ref.record(v, attrs)
                bulk.record_many(h_bulk, values, attrs)
        if i % 3 == 2:  # collect mid-stream: delta readers reset, cumulative ones carry on
            for r_ref, r_bulk in zip(ref_readers, bulk_readers):
                _assert_close(_points(r_ref), _points(r_bulk))
    exemplars: list = []
    for r_ref, r_bulk in zip(ref_readers, bulk_readers):
        ref, got = _points(r_ref, exemplars), _points(r_bulk, exemplars)
        assert ref, "the comparison must see data points"
        _assert_close(ref, got)
    assert exemplars == []


def test_invalid_values_are_dropped_as_the_sdk_drops_them(caplog):
    _, ref_readers, ref_h = _provider()
    _, bulk_readers, bulk_h = _provider()
    bulk = BulkHistograms(bulk_h)
    attrs = {"gen_ai.request.model": "m"}
    values = [0.5, -1.0, float("nan"), 0.25, float("inf")]
    for v in values:
        ref_h[0].record(v, attrs)
    with caplog.at_level(logging.WARNING):
        bulk.record_many(bulk_h[0], values, attrs)
    assert "non-negative" in caplog.text or "not finite" in caplog.text
    _assert_close(_points(ref_readers[0]), _points(bulk_readers[0]))
    ((count, total, *_),) = _points(bulk_readers[0]).values()
    assert (count, total) == (2, 0.75)


def test_exemplars_on_or_missing_internals_fall_back_to_record(monkeypatch):
    _, ref_readers, ref_h = _provider()
    _, on_readers, on_h = _provider(AlwaysOnExemplarFilter())
    with structlog.testing.capture_logs() as logs:
        bulk = BulkHistograms(on_h)
    assert not bulk.is_bulk(on_h[0])
    assert any(
        entry["event"] == "histogram_bulk_path_off"
        and entry["problem"] == "exemplar filter AlwaysOnExemplarFilter"
        for entry in logs
    ), logs
    monkeypatch.setattr(histogram_bulk, "_hash_attributes", None)
    _, gone_readers, gone_h = _provider()
    bulk_gone = BulkHistograms(gone_h)
    assert not bulk_gone.is_bulk(gone_h[0])
    attrs = {"gen_ai.request.model": "m"}
    values = [0.1, 0.2, 0.9]
    for v in values:
        ref_h[0].record(v, attrs)
    bulk.record_many(on_h[0], values, attrs)
    bulk_gone.record_many(gone_h[0], values, attrs)
    ref = _points(ref_readers[0])
    assert ref
    _assert_close(ref, _points(gone_readers[0]))
    on = _points(on_readers[0])  # same figures; exemplars are not part of the comparison
    _assert_close(ref, on)
