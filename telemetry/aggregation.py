"""OpenTelemetry instruments, Views and batch aggregation of valid SpeculativeMetrics.

Hot-path design (ingest runs at tens of thousands of records per second on one core):
records of a batch are first summed in plain Python ints per identity (target model, method,
draft model, k); then every counter gets one `.add()` per attribute set per batch, and every
histogram gets its batch of values for an attribute set in one step (histogram_bulk.py: the
SDK's per-value `record()` would cost more than everything else together). Attribute dicts
are built once per identity and cached, never per record. The exception is a record with a
sampled request span (tracing on, docs/tracing.md): its histogram values go through
`record()` one by one, in the span's context and with the request id, so that they can become
exemplars naming the trace, the span and the request.

Names: `specdec.*` for the speculative-decoding series (no semantic convention exists), the
GenAI semantic-convention names for latency (with finer buckets than the conventions
recommend, see TTFT_BUCKETS), `specdec.sidecar.*` for the pipeline's self-metrics.
docs/metrics.md documents every series.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from specdec.v1 import metrics_pb2
from specdec_common.proto_names import METHOD_NAMES
from telemetry.dedupe import EVICTION_CAUSES
from telemetry.histogram_bulk import BulkHistograms
from telemetry.validation import REASONS, TRACE_REASONS
from telemetry.windows import SlidingWindow

# ---- names -------------------------------------------------------------------------------
REQUESTS = "specdec.requests"
PROMPT_TOKENS = "specdec.prompt_tokens"
COMPLETION_TOKENS = "specdec.completion_tokens"
VERIFY_PASSES = "specdec.verify_passes"
DRAFT_PASSES = "specdec.draft_passes"
PROPOSED_DRAFTS = "specdec.proposed_drafts"
ACCEPTED_DRAFTS = "specdec.accepted_drafts"
POSITION_PROPOSED = "specdec.position.proposed"
POSITION_ACCEPTED = "specdec.position.accepted"
PASSES_BY_ACCEPTED = "specdec.draft_passes_by_accepted"
REQUEST_ACCEPT_RATE = "specdec.request.accept_rate"
REQUEST_ACCEPT_LENGTH = "specdec.request.accept_length"
WINDOW_ACCEPT_RATE = "specdec.window.accept_rate"
WINDOW_ACCEPT_LENGTH = "specdec.window.accept_length"
# GenAI semantic conventions (gen-ai-metrics.md, "Generative AI model server metrics")
TTFT = "gen_ai.server.time_to_first_token"
TPOT = "gen_ai.server.time_per_output_token"
REQUEST_DURATION = "gen_ai.server.request.duration"
# self-metrics
RECORDS_RECEIVED = "specdec.sidecar.records.received"
RECORDS_AGGREGATED = "specdec.sidecar.records.aggregated"
RECORDS_REJECTED = "specdec.sidecar.records.rejected"
RECORDS_DUPLICATE = "specdec.sidecar.records.duplicate"
SERVICE_DROPPED = "specdec.sidecar.service_dropped_records"
EXPORT_FAILURES = "specdec.sidecar.export.failures"
SOURCES_EVICTED = "specdec.sidecar.sources.evicted"
TRACE_CONTEXTS_IGNORED = "specdec.sidecar.trace_contexts.ignored"

# ---- attribute names -------------------------------------------------------------------
ATTR_MODEL = "gen_ai.request.model"  # semconv: the target model
ATTR_METHOD = "specdec.method"  # none | ngram | draft_model
ATTR_DRAFT_MODEL = "specdec.draft_model"  # "" unless method is draft_model
ATTR_K = "specdec.num_draft_tokens"  # k (int)
ATTR_POSITION = "position"  # docs/metrics-contract.md: draft position i = 0..k-1
ATTR_ACCEPTED = "accepted"  # docs/metrics-contract.md: accepted count j = 0..k
ATTR_REASON = "reason"
ATTR_EXPORTER = "exporter"
ATTR_CAUSE = "cause"
# The request id: on a traced record's histogram measurements only, where the Views drop it
# from the series (it would explode their number) and the exemplar keeps it (its
# filtered_attributes), beside the request's trace and span id.
ATTR_REQUEST_ID = "specdec.request.id"
IDENTITY_KEYS = frozenset({ATTR_MODEL, ATTR_METHOD, ATTR_DRAFT_MODEL, ATTR_K})


# ---- bucket boundaries -----------------------------------------------------------------
ACCEPT_RATE_BUCKETS: tuple[float, ...] = tuple(round(i * 0.05, 2) for i in range(21))  # 0..1
# The GenAI conventions' recommended boundaries (ExplicitBucketBoundaries advice), seconds.
SEMCONV_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
SEMCONV_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The sidecar's defaults depart from them on purpose (docs/metrics.md, "Latency buckets"): a
# GPU yields a token every 1-6 ms, below the recommended first TPOT bound of 10 ms, so every
# request would land in one bucket. These resolve 0.1 ms to 10 s (time per output token in
# steps of at most 25% from 1 to 10 ms, time to first token in steps of at most 50% from
# 0.5 to 100 ms) and contain every recommended boundary, so a query on one of those still
# finds its bucket. --ttft-buckets / --tpot-buckets replace them.
TTFT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS = (
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.00125,
    0.0015,
    0.00175,
    0.002,
    0.0025,
    0.003,
    0.0035,
    0.004,
    0.005,
    0.006,
    0.007,
    0.008,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


def accept_length_buckets(max_k: int) -> tuple[float, ...]:
    """1 .. max_k + 1: quarter steps to 3, half steps to 5, integers to 9, then doubling."""
    top = max_k + 1
    steps = (
        1.0,
        1.25,
        1.5,
        1.75,
        2.0,
        2.25,
        2.5,
        2.75,
        3.0,
        3.5,
        4.0,
        4.5,
        5.0,
        6.0,
        7.0,
        8.0,
        9.0,
        12.0,
        16.0,
        24.0,
        32.0,
        48.0,
        64.0,
        96.0,
        128.0,
    )
    return tuple(x for x in steps if x < top) + (float(top),)


def views(
    max_k: int, ttft_buckets: Sequence[float] = TTFT_BUCKETS, tpot_buckets: Sequence[float] = TPOT_BUCKETS
) -> list[View]:
    """The SDK Views that give each histogram its explicit bucket boundaries."""

    def hist(name: str, bounds: Sequence[float]) -> View:
        return View(
            instrument_name=name,
            attribute_keys=IDENTITY_KEYS,
            aggregation=ExplicitBucketHistogramAggregation(boundaries=bounds),
        )

    return [
        hist(REQUEST_ACCEPT_RATE, ACCEPT_RATE_BUCKETS),
        hist(REQUEST_ACCEPT_LENGTH, accept_length_buckets(max_k)),
        hist(TTFT, ttft_buckets),
        hist(TPOT, tpot_buckets),
        hist(REQUEST_DURATION, DURATION_BUCKETS),
    ]


Identity = tuple  # (target_model, method, draft_model, k)

_SUCCESS = frozenset(
    {metrics_pb2.FINISH_REASON_EOS, metrics_pb2.FINISH_REASON_STOP_SEQUENCE, metrics_pb2.FINISH_REASON_LENGTH}
)


class BatchSums:
    """Per-identity sums of one batch (plain Python ints and value lists)."""

    __slots__ = (
        "counts",
        "pos_proposed",
        "pos_accepted",
        "hist",
        "rates",
        "lengths",
        "ttfts",
        "tpots",
        "durations",
        "traced",
    )

    def __init__(self, k: int) -> None:
        # requests, prompt, completion, verify, draft passes, proposed, accepted
        self.counts = [0, 0, 0, 0, 0, 0, 0]
        self.pos_proposed = [0] * k
        self.pos_accepted = [0] * k
        self.hist = [0] * (k + 1)
        self.rates: list[float] = []
        self.lengths: list[float] = []
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.durations: list[float] = []
        # traced records' histogram values, recorded one by one in their span's context:
        # (context, request id, rate, length, ttft, tpot, duration), None where undefined
        self.traced: list[tuple] = []


def _add_lists(a: list[int], b) -> list[int]:
    return list(map(int.__add__, a, b))


def accumulate(
    batch: dict[Hashable, BatchSums], m: metrics_pb2.SpeculativeMetrics, context: Context | None = None
) -> None:
    """Add one *valid* record to the batch sums; `context`: its span's, when it has one."""
    k = m.num_draft_tokens
    key = (m.target_model, m.method, m.draft_model, k)
    s = batch.get(key)
    if s is None:
        s = batch[key] = BatchSums(k)
    c = s.counts
    verify = m.verify_passes
    proposed = m.proposed_drafts
    completion = m.completion_tokens
    c[0] += 1
    c[1] += m.prompt_tokens
    c[2] += completion
    c[3] += verify
    c[4] += m.draft_passes
    c[5] += proposed
    c[6] += m.accepted_drafts
    if proposed:
        s.pos_proposed = _add_lists(s.pos_proposed, m.proposed_per_position)
        s.pos_accepted = _add_lists(s.pos_accepted, m.accepted_per_position)
        s.hist = _add_lists(s.hist, m.accept_histogram)
    duration = m.duration_seconds
    ttft = tpot = None
    if m.HasField("time_to_first_token_seconds") and m.finish_reason in _SUCCESS:
        ttft = m.time_to_first_token_seconds
        if completion >= 2:
            tpot = max(0.0, duration - ttft) / (completion - 1)
    if context is not None:
        s.traced.append(
            (
                context,
                m.request_id,
                m.accept_rate if proposed else None,
                m.accept_length if verify else None,
                ttft,
                tpot,
                duration,
            )
        )
        return
    if proposed:
        s.rates.append(m.accept_rate)
    if verify:
        s.lengths.append(m.accept_length)
    s.durations.append(duration)
    if ttft is not None:
        s.ttfts.append(ttft)
        if tpot is not None:
            s.tpots.append(tpot)


class Aggregator:
    """Owns the instruments; `commit` turns one batch's sums into SDK calls."""

    def __init__(
        self,
        meter: Meter,
        window: SlidingWindow,
        max_k: int,
        exporters: Sequence[str] = (),
        tracing: bool = False,
    ) -> None:
        """exporters: the exporters whose failures are counted (`exporter` attribute);
        tracing: whether the sidecar emits spans (ignored trace contexts are counted)."""
        self.window = window
        self.max_k = max_k
        self._attrs: dict[Hashable, dict] = {}
        self._pos_attrs: dict[Hashable, tuple[dict, ...]] = {}
        self._acc_attrs: dict[Hashable, tuple[dict, ...]] = {}
        self._reason_attrs: dict[str, dict] = {}
        self._exporter_attrs: dict[str, dict] = {}
        counter = meter.create_counter
        self.requests = counter(
            REQUESTS, unit="{request}", description="Requests finished (any finish reason)"
        )
        self.prompt_tokens = counter(
            PROMPT_TOKENS, unit="{token}", description="Prompt tokens (after the chat template)"
        )
        self.completion_tokens = counter(
            COMPLETION_TOKENS, unit="{token}", description="Tokens emitted to clients"
        )
        self.verify_passes = counter(
            VERIFY_PASSES, unit="{pass}", description="Decode-phase target forward passes"
        )
        self.draft_passes = counter(
            DRAFT_PASSES, unit="{pass}", description="Decode passes that proposed at least one draft"
        )
        self.proposed = counter(
            PROPOSED_DRAFTS, unit="{token}", description="Draft tokens proposed (counted, not derived from k)"
        )
        self.accepted = counter(
            ACCEPTED_DRAFTS, unit="{token}", description="Draft tokens accepted (bonus token excluded)"
        )
        self.pos_proposed = counter(
            POSITION_PROPOSED, unit="{pass}", description="Passes that proposed a draft at `position`"
        )
        self.pos_accepted = counter(
            POSITION_ACCEPTED, unit="{pass}", description="Passes whose draft at `position` was accepted"
        )
        self.passes_by_accepted = counter(
            PASSES_BY_ACCEPTED,
            unit="{pass}",
            description="Draft passes that accepted exactly `accepted` drafts",
        )
        hist = meter.create_histogram
        self.h_rate = hist(
            REQUEST_ACCEPT_RATE,
            unit="1",
            description="Per-request accept rate (requests that proposed drafts)",
        )
        self.h_length = hist(
            REQUEST_ACCEPT_LENGTH,
            unit="{token}",
            description="Per-request accept length: tokens per target pass",
        )
        self.h_ttft = hist(TTFT, unit="s", description="Time to generate first token")
        self.h_tpot = hist(
            TPOT, unit="s", description="Time per output token generated after the first token"
        )
        self.h_duration = hist(
            REQUEST_DURATION, unit="s", description="Generative AI server request duration"
        )
        self._histograms = BulkHistograms(
            (self.h_rate, self.h_length, self.h_ttft, self.h_tpot, self.h_duration)
        )
        meter.create_observable_gauge(
            WINDOW_ACCEPT_RATE,
            callbacks=[self._observe_rate],
            unit="1",
            description=f"accepted/proposed drafts over the last {window.window_s:g} s",
        )
        meter.create_observable_gauge(
            WINDOW_ACCEPT_LENGTH,
            callbacks=[self._observe_length],
            unit="{token}",
            description=f"(accepted + verify passes)/verify passes over the last {window.window_s:g} s",
        )
        # self-metrics
        self.received = counter(
            RECORDS_RECEIVED, unit="{record}", description="Records received (before dedupe and validation)"
        )
        self.aggregated = counter(
            RECORDS_AGGREGATED, unit="{record}", description="Records that passed validation and were counted"
        )
        self.rejected = counter(
            RECORDS_REJECTED, unit="{record}", description="Records rejected, by broken invariant (`reason`)"
        )
        self.duplicates = counter(
            RECORDS_DUPLICATE, unit="{record}", description="Resent records dropped as duplicates"
        )
        self.service_dropped = counter(
            SERVICE_DROPPED,
            unit="{record}",
            description="Records the reporting services dropped from their full buffers",
        )
        self.export_failures = counter(
            EXPORT_FAILURES, unit="{export}", description="Failed metric exports, by `exporter`"
        )
        self.sources_evicted = counter(
            SOURCES_EVICTED,
            unit="{source}",
            description="Sources the duplicate filter forgot, by `cause` (idle, count, bytes): "
            "records they resend are counted again",
        )
        self._cause_attrs = {cause: {ATTR_CAUSE: cause} for cause in EVICTION_CAUSES}
        self.trace_ignored = counter(
            TRACE_CONTEXTS_IGNORED,
            unit="{record}",
            description="Records whose trace context was malformed, by `reason`: counted, "
            "but without a span or exemplars",
        )
        self._trace_reason_attrs = {reason: {ATTR_REASON: reason} for reason in TRACE_REASONS}
        # Make every self-metric series exist (at 0) from the start, including one per
        # rejection reason and per failure-counting exporter: a series born at 1 is invisible
        # to increase()/rate() (they need two samples), so the first event would be missed.
        for c in (self.received, self.aggregated, self.duplicates, self.service_dropped):
            c.add(0)
        for reason in REASONS:
            self.count_rejected(reason, 0)
        for exporter in exporters:
            self.count_export_failure(exporter, 0)
        for cause in EVICTION_CAUSES:
            self.count_evicted(cause, 0)
        if tracing:
            for reason in TRACE_REASONS:
                self.count_trace_ignored(reason, 0)

    # ---- attribute caches ------------------------------------------------------------
    def attrs(self, key: Hashable) -> dict:
        a = self._attrs.get(key)
        if a is None:
            model, method, draft, k = key
            a = self._attrs[key] = {
                ATTR_MODEL: model,
                ATTR_METHOD: METHOD_NAMES.get(method, str(method)),
                ATTR_DRAFT_MODEL: draft,
                ATTR_K: k,
            }
        return a

    def _positional(
        self, key: Hashable, n: int, name: str, cache: dict[Hashable, tuple[dict, ...]]
    ) -> tuple[dict, ...]:
        t = cache.get(key)
        if t is None:
            base = self.attrs(key)
            t = cache[key] = tuple({**base, name: i} for i in range(n))
        return t

    # ---- the batch commit --------------------------------------------------------------
    def commit(self, batch: dict[Hashable, BatchSums]) -> None:
        for key, s in batch.items():
            a = self.attrs(key)
            c = s.counts
            self.requests.add(c[0], a)
            self.prompt_tokens.add(c[1], a)
            self.completion_tokens.add(c[2], a)
            self.verify_passes.add(c[3], a)
            self.draft_passes.add(c[4], a)
            self.proposed.add(c[5], a)
            self.accepted.add(c[6], a)
            k = key[3]
            if k:
                pa = self._positional(key, k, ATTR_POSITION, self._pos_attrs)
                add_p, add_a = self.pos_proposed.add, self.pos_accepted.add
                for i in range(k):
                    add_p(s.pos_proposed[i], pa[i])
                    add_a(s.pos_accepted[i], pa[i])
                ha = self._positional(key, k + 1, ATTR_ACCEPTED, self._acc_attrs)
                add_h = self.passes_by_accepted.add
                for j in range(k + 1):
                    add_h(s.hist[j], ha[j])
            record_many = self._histograms.record_many
            record_many(self.h_rate, s.rates, a)
            record_many(self.h_length, s.lengths, a)
            record_many(self.h_ttft, s.ttfts, a)
            record_many(self.h_tpot, s.tpots, a)
            record_many(self.h_duration, s.durations, a)
            if s.traced:
                self._record_traced(s.traced, a)
            self.window.add(key, c[5], c[6], c[3])
            self.aggregated.add(c[0])

    # ---- self-metrics ----------------------------------------------------------------
    def count_rejected(self, reason: str, n: int = 1) -> None:
        a = self._reason_attrs.get(reason)
        if a is None:
            a = self._reason_attrs[reason] = {ATTR_REASON: reason}
        self.rejected.add(n, a)

    def count_export_failure(self, exporter: str, n: int = 1) -> None:
        a = self._exporter_attrs.get(exporter)
        if a is None:
            a = self._exporter_attrs[exporter] = {ATTR_EXPORTER: exporter}
        self.export_failures.add(n, a)

    def count_evicted(self, cause: str, n: int = 1) -> None:
        self.sources_evicted.add(n, self._cause_attrs[cause])

    def count_trace_ignored(self, reason: str, n: int = 1) -> None:
        self.trace_ignored.add(n, self._trace_reason_attrs[reason])

    def _record_traced(self, traced: list[tuple], attrs: dict) -> None:
        """A traced record's values, each in its span's context (the exemplar filter takes
        the trace and span id from there) and with its request id (the Views drop it from
        the series; the exemplar keeps it)."""
        for context, request_id, rate, length, ttft, tpot, duration in traced:
            a = {**attrs, ATTR_REQUEST_ID: request_id}
            for histogram, value in (
                (self.h_rate, rate),
                (self.h_length, length),
                (self.h_ttft, ttft),
                (self.h_tpot, tpot),
                (self.h_duration, duration),
            ):
                if value is not None:
                    histogram.record(value, a, context=context)

    # ---- window gauges ---------------------------------------------------------------
    def _observe_rate(self, options: CallbackOptions):
        return [Observation(v, self.attrs(key)) for key, v in self.window.accept_rates()]

    def _observe_length(self, options: CallbackOptions):
        return [Observation(v, self.attrs(key)) for key, v in self.window.accept_lengths()]
