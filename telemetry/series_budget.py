"""The label sets the aggregates may hold: bounded overall and per source.

Every identity (target model, method, draft model, k) becomes the attribute set of a family
of series; the OpenTelemetry SDK keeps at most 2,000 attribute sets per instrument and folds
every later one into a single `otel_metric_overflow` series, stripped of its labels. Without a
bound of its own, records under invented identities would fill that space first and push the
real services' new series into the overflow. So the ingest admits a new identity only while
the series it adds stay within two budgets, counted in series of the largest per-identity
instrument (`specdec.draft_passes_by_accepted`: k + 1 series, one per accepted count):

- overall (`--max-series`), below the SDK's limit (checked at start);
- per source (`--max-series-per-source`), so that one reporter cannot use the whole budget.

An identity once admitted stays (its series are cumulative and live as long as the process),
and any source may then use it at no cost. A record of an identity that does not fit is
rejected with reason `series_limit` or `source_series_limit`.
"""

from __future__ import annotations

from collections.abc import Hashable

from telemetry.dedupe import SourceState

# The SDK's default cardinality limit per instrument (opentelemetry-sdk's
# _DEFAULT_CARDINALITY_LIMIT); the last of its attribute sets is the overflow series.
SDK_CARDINALITY_LIMIT = 2000
# Each identity also costs the Prometheus scrape about 75 lines (the 5 histograms' buckets),
# each carrying the identity's labels: docs/metrics.md ("Label budget").
DEFAULT_MAX_SERIES = 500
DEFAULT_MAX_SERIES_PER_SOURCE = 200


def series_of(identity: Hashable) -> int:
    """Series an identity adds to the largest per-identity instrument: k + 1."""
    return identity[3] + 1


class SeriesBudget:
    """Not thread-safe: used under the aggregation lock."""

    def __init__(
        self, max_series: int = DEFAULT_MAX_SERIES, max_series_per_source: int = DEFAULT_MAX_SERIES_PER_SOURCE
    ) -> None:
        self.max_series = max_series
        self.max_series_per_source = max_series_per_source
        self._admitted: set[Hashable] = set()
        self.series = 0

    def admit(self, identity: Hashable, source: SourceState) -> str | None:
        """None when records of `identity` may be aggregated, else the rejection reason."""
        if identity in self._admitted:
            return None
        cost = series_of(identity)
        if source.series + cost > self.max_series_per_source:
            return "source_series_limit"
        if self.series + cost > self.max_series:
            return "series_limit"
        self._admitted.add(identity)
        self.series += cost
        source.series += cost
        return None

    def __len__(self) -> int:
        return len(self._admitted)
