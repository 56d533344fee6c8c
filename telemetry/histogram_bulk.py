"""Many values of one SDK histogram, for one attribute set, in one step.

Why this exists: the OpenTelemetry SDK's `Histogram.record()` cleans, copies and hashes the
attribute dict on every call, and the sidecar records about four histogram values per
SpeculativeMetrics record, so the per-value API alone kept ingest below its target
(bench/RESULTS.md, "Sidecar ingest"). A batch of records, though, has a handful of attribute
sets. `record_many` therefore resolves the
SDK's own aggregation for an attribute set once per batch and feeds it every value, taking
the same lock the SDK's `consume_measurement` takes, so collection (cumulative or delta)
sees exactly what per-value `record()` calls would have produced: same buckets, sum, count,
min and max (tests/telemetry/test_histogram_bulk.py compares the two on both
temporalities and several readers).

This reaches into SDK internals (`_measurement_consumer`, the reader storages, the
view-instrument matches). They are checked once, when a `BulkHistograms` is built; if
this SDK version does not have them, or the exemplar filter is neither always-off nor
trace-based, every call falls back to the public per-value `record()` and a warning says so.
Exemplars: the values of a batch share one context (the caller's), so the exemplar filter's
verdict is taken once per batch with it, as the SDK takes it per value. With the sidecar's
filters (always-off, or trace-based when tracing is on, where the ingest's context holds no
span) that verdict is "no": values recorded in bulk are never offered to an exemplar
reservoir. Traced records' values go through `record()` in their span's context instead
(aggregation.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from time import time_ns

import structlog
from opentelemetry.context import get_current
from opentelemetry.metrics import Histogram

log = structlog.get_logger(__name__)

try:  # SDK internals; absent or different in another version -> public API only
    from opentelemetry.attributes import _clean_attribute_value
    from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes
    from opentelemetry.sdk.metrics._internal.exemplar import (
        AlwaysOffExemplarFilter,
        TraceBasedExemplarFilter,
    )
    from opentelemetry.sdk.metrics._internal.measurement import Measurement
except ImportError:  # pragma: no cover - depends on the installed SDK
    _hash_attributes = None


def _fast_path_problem(histogram: Histogram) -> str | None:
    """None when `histogram` can be fed in bulk; otherwise why not."""
    if _hash_attributes is None:
        return "opentelemetry-sdk internals not found"
    try:
        consumer = histogram._measurement_consumer  # type: ignore[attr-defined]
        storages = consumer._reader_storages
        exemplar_filter = consumer._sdk_config.exemplar_filter
        if type(exemplar_filter) not in (AlwaysOffExemplarFilter, TraceBasedExemplarFilter):
            # their verdict depends on the context alone; another filter's may not
            return f"exemplar filter {type(exemplar_filter).__name__}"
        for storage in storages.values():
            for match in storage._get_or_init_view_instrument_match(histogram):
                match._lock, match._view._attribute_keys  # noqa: B018 - presence check
                match._get_or_create_aggregation  # noqa: B018 - presence check
        histogram._is_enabled  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as e:
        return f"opentelemetry-sdk internals differ ({e})"
    return None


class BulkHistograms:
    """`record_many(histogram, values, attributes)` for the histograms of one MeterProvider."""

    def __init__(self, histograms: Iterable[Histogram]) -> None:
        problems = {h.name: _fast_path_problem(h) for h in histograms}
        self._bulk = {name for name, problem in problems.items() if problem is None}
        for name, problem in problems.items():
            if problem is not None:
                log.warning(
                    "histogram_bulk_path_off", histogram=name, problem=problem, fallback="per-value record()"
                )

    def is_bulk(self, histogram: Histogram) -> bool:
        return histogram.name in self._bulk

    def record_many(
        self, histogram: Histogram, values: list[float], attributes: Mapping[str, object]
    ) -> None:
        """The same as `for v in values: histogram.record(v, attributes)`."""
        if not values:
            return
        if histogram.name not in self._bulk or not histogram._is_enabled():  # type: ignore[attr-defined]
            for v in values:
                histogram.record(v, attributes)
            return
        # The SDK drops (and logs) non-finite and negative values: let record() do that.
        good = [v for v in values if v >= 0 and math.isfinite(v)]
        if len(good) != len(values):
            for v in values:
                if not (v >= 0 and math.isfinite(v)):
                    histogram.record(v, attributes)
        if not good:
            return
        attrs = _clean_attribute_value(attributes, None)  # as Measurement does: a new dict
        now, context = time_ns(), get_current()
        measurements = [Measurement(v, now, histogram, context, None) for v in good]
        consumer = histogram._measurement_consumer  # type: ignore[attr-defined]
        # The filter's verdict depends on the context only (checked in _fast_path_problem).
        sample = consumer._sdk_config.exemplar_filter.should_sample(good[0], now, attrs, context)
        for storage in consumer._reader_storages.values():
            for match in storage._get_or_init_view_instrument_match(histogram):
                keys = match._view._attribute_keys
                kept = attrs if keys is None else {k: v for k, v in attrs.items() if k in keys}
                # As _ViewInstrumentMatch.consume_measurement, but once per batch: under the
                # match's lock, so a collect (which may swap the aggregations out on delta
                # temporality) sees all of this batch's values or none of them.
                with match._lock:
                    aggregation = match._get_or_create_aggregation(_hash_attributes(kept), kept)
                    aggregate = aggregation.aggregate
                    for m in measurements:
                        aggregate(m, sample)
