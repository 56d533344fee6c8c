"""The invariants of docs/metrics-contract.md, written once: `check(m)` names the first one
a record breaks.

Every SpeculativeMetrics the sidecar ingests goes through `check` before it may touch an
aggregate. The function is on the ingest hot path (tens of thousands of records per second on
one core), so it avoids per-element Python loops where a C-level builtin does the same job
(`sum`, `map`, `sorted`), and returns a short reason code (a `REASONS` member) that becomes the
`reason` attribute of the rejected-records self-metric.
"""

from __future__ import annotations

import math
import operator

from specdec.v1 import metrics_pb2, telemetry_pb2

# Bounds that are not contract invariants but keep garbage from hurting the sidecar:
DEFAULT_MAX_K = 64  # longest speculation the sidecar accepts (array lengths, label cardinality)
MAX_IDENTITY_LEN = 256  # target/draft model name length (they become attribute values)
MAX_STRING_LEN = 256  # request_id (the service allows 128) and instance_id
MAX_SOURCE_ID_LEN = 512  # ReportRequest.source_id: the reporter's is instance id + 22 characters
MAX_SECONDS = 1e6  # any timing above this (11.6 days) is garbage; keeps histogram sums finite
MAX_COUNT = 1 << 40  # any per-request counter above this is garbage (OTLP ints are int64)
# MetricsRecord.dropped_before above this is garbage (25 days of drops at 2,000 records/s)
MAX_DROPPED_BEFORE = 1 << 32
RATIO_REL_TOL = 1e-6  # accept_rate / accept_length vs. the counters
TIME_TOL_S = 1e-6  # ordering of the monotonic timings

_NONE = metrics_pb2.SPECULATION_METHOD_NONE
_DRAFT_MODEL = metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL
_METHOD_UNSPECIFIED = metrics_pb2.SPECULATION_METHOD_UNSPECIFIED
_KNOWN_METHODS = frozenset(metrics_pb2.SpeculationMethod.values())
_FINISH_UNSPECIFIED = metrics_pb2.FINISH_REASON_UNSPECIFIED
_KNOWN_FINISH_REASONS = frozenset(metrics_pb2.FinishReason.values())
_isfinite = math.isfinite
_mul = operator.mul
_le = operator.le

# Reason codes, in the order `check` tests them. Stable: they are exported as attribute values.
REASONS: tuple[str, ...] = (
    "invalid_sequence",  # sequence 0 (sequences start at 1); set by the ingest, not by check()
    "missing_metrics",  # record without a SpeculativeMetrics; set by the ingest
    "missing_source_id",  # batch without source_id; set by the ingest
    "source_id_too_long",  # source_id over MAX_SOURCE_ID_LEN characters; set by the ingest
    # a known source's sequence ahead of its watermark by more than the records it says it
    # dropped plus --max-sequence-jump; set by the ingest
    "sequence_jump",
    "unknown_method",
    "unspecified_method",  # SPECULATION_METHOD_UNSPECIFIED: a service always names its drafter
    "unknown_finish_reason",
    "unspecified_finish_reason",  # FINISH_REASON_UNSPECIFIED
    "identity_too_long",
    "string_too_long",  # request_id or instance_id over MAX_STRING_LEN characters
    "num_draft_tokens_too_large",
    "num_draft_tokens_without_speculation",  # method NONE needs k = 0
    "draft_model_without_draft_method",  # draft_model set but method is not DRAFT_MODEL
    "accept_histogram_length",  # len != k + 1
    "proposed_per_position_length",  # len != k
    "accepted_per_position_length",  # len != k
    "count_out_of_range",
    "drafts_without_num_draft_tokens",  # k = 0 but draft passes, proposed or accepted drafts
    "draft_passes_exceed_verify_passes",
    "draft_passes_exceed_proposed",  # a draft pass proposes at least one draft
    "accept_histogram_sum",  # sum_j h[j] != draft_passes
    "accept_histogram_weighted_sum",  # sum_j j*h[j] != accepted_drafts
    "proposed_per_position_sum",
    "accepted_per_position_sum",
    "accepted_exceeds_proposed_at_position",
    "accepted_per_position_increasing",
    "accepted_exceeds_proposed",
    "proposed_exceeds_capacity",  # proposed_drafts > k * verify_passes
    "completion_tokens_exceed_bound",  # completion > 1 + verify_passes + accepted_drafts
    # Identities that follow from the per-pass definitions (not listed among the contract's
    # invariants, but exact): every draft pass proposes position 0; a draft is proposed at
    # position i only if it was at i - 1; the draft at position i was accepted iff the pass
    # accepted more than i drafts.
    "proposed_per_position_first",  # proposed_per_position[0] != draft_passes
    "proposed_per_position_increasing",
    "accepted_per_position_histogram",  # accepted_per_position[i] != sum_{j > i} h[j]
    "accept_rate_presence",  # present iff proposed_drafts > 0
    "accept_rate_mismatch",
    "accept_length_presence",  # present iff verify_passes > 0
    "accept_length_mismatch",
    "invalid_timing",  # negative or non-finite
    "timing_out_of_range",  # above MAX_SECONDS
    "timing_order",  # queue_time <= time_to_first_token <= duration
    "time_to_first_token_missing",  # tokens were emitted but no first-token time
    # a new identity (model, method, draft model, k) beyond --max-series or the source's
    # --max-series-per-source; set by the ingest
    "series_limit",
    "source_series_limit",
    "malformed_batch",  # unparseable ReportRequest (counted per batch); set by the ingest
    "internal_error",  # a bug in the sidecar; set by the ingest, never expected
)


def check(m: metrics_pb2.SpeculativeMetrics, max_k: int = DEFAULT_MAX_K) -> str | None:
    """Return the reason code of the first broken invariant, or None if `m` is valid."""
    method = m.method
    if method not in _KNOWN_METHODS:
        return "unknown_method"
    if method == _METHOD_UNSPECIFIED:
        return "unspecified_method"
    finish_reason = m.finish_reason
    if finish_reason not in _KNOWN_FINISH_REASONS:
        return "unknown_finish_reason"
    if finish_reason == _FINISH_UNSPECIFIED:
        return "unspecified_finish_reason"
    if len(m.target_model) > MAX_IDENTITY_LEN or len(m.draft_model) > MAX_IDENTITY_LEN:
        return "identity_too_long"
    if len(m.request_id) > MAX_STRING_LEN or len(m.instance_id) > MAX_STRING_LEN:
        return "string_too_long"
    k = m.num_draft_tokens
    if k > max_k:
        return "num_draft_tokens_too_large"
    if method == _NONE and k:
        return "num_draft_tokens_without_speculation"
    if m.draft_model and method != _DRAFT_MODEL:
        return "draft_model_without_draft_method"
    hist = m.accept_histogram
    pp = m.proposed_per_position
    ap = m.accepted_per_position
    if len(hist) != k + 1:
        return "accept_histogram_length"
    if len(pp) != k:
        return "proposed_per_position_length"
    if len(ap) != k:
        return "accepted_per_position_length"
    verify = m.verify_passes
    drafts = m.draft_passes
    proposed = m.proposed_drafts
    accepted = m.accepted_drafts
    completion = m.completion_tokens
    if verify > MAX_COUNT or proposed > MAX_COUNT or completion > MAX_COUNT or m.prompt_tokens > MAX_COUNT:
        # draft_passes <= verify_passes and accepted <= proposed bound the others.
        return "count_out_of_range"
    if not k and (drafts or proposed or accepted):
        return "drafts_without_num_draft_tokens"
    if drafts > verify:
        return "draft_passes_exceed_verify_passes"
    if drafts > proposed:
        return "draft_passes_exceed_proposed"
    if sum(hist) != drafts:
        return "accept_histogram_sum"
    if sum(map(_mul, hist, range(k + 1))) != accepted:
        return "accept_histogram_weighted_sum"
    if sum(pp) != proposed:
        return "proposed_per_position_sum"
    if sum(ap) != accepted:
        return "accepted_per_position_sum"
    if k:
        if not all(map(_le, ap, pp)):
            return "accepted_exceeds_proposed_at_position"
        apl = list(ap)
        if apl != sorted(apl, reverse=True):
            return "accepted_per_position_increasing"
    if accepted > proposed:
        return "accepted_exceeds_proposed"
    if proposed > k * verify:
        return "proposed_exceeds_capacity"
    if completion > 1 + verify + accepted:
        return "completion_tokens_exceed_bound"
    if k:
        if pp[0] != drafts:
            return "proposed_per_position_first"
        ppl = list(pp)
        if ppl != sorted(ppl, reverse=True):
            return "proposed_per_position_increasing"
        tail = 0
        hl = list(hist)
        for i in range(k - 1, -1, -1):
            tail += hl[i + 1]
            if apl[i] != tail:
                return "accepted_per_position_histogram"
    # Relative tolerance RATIO_REL_TOL * max(1, |expected|), written out for the hot path:
    # the expected rate is in [0, 1] (accepted <= proposed was checked above), the expected
    # length is >= 1. NaN compares False, so a NaN value fails.
    if m.HasField("accept_rate"):
        if not proposed:
            return "accept_rate_presence"
        if not abs(m.accept_rate - accepted / proposed) <= RATIO_REL_TOL:
            return "accept_rate_mismatch"
    elif proposed:
        return "accept_rate_presence"
    if m.HasField("accept_length"):
        if not verify:
            return "accept_length_presence"
        expected = (accepted + verify) / verify
        if not abs(m.accept_length - expected) <= RATIO_REL_TOL * expected:
            return "accept_length_mismatch"
    elif verify:
        return "accept_length_presence"
    queue = m.queue_time_seconds
    duration = m.duration_seconds
    if not (_isfinite(queue) and _isfinite(duration) and queue >= 0.0 and duration >= 0.0):
        return "invalid_timing"
    if duration > MAX_SECONDS:  # queue <= ttft <= duration bounds the others
        return "timing_out_of_range"
    if queue > duration + TIME_TOL_S:
        return "timing_order"
    if m.HasField("time_to_first_token_seconds"):
        ttft = m.time_to_first_token_seconds
        if not (_isfinite(ttft) and ttft >= 0.0):
            return "invalid_timing"
        if ttft > duration + TIME_TOL_S or queue > ttft + TIME_TOL_S:
            return "timing_order"
    elif completion:
        return "time_to_first_token_missing"
    return None


# ---- the record's trace context (docs/tracing.md) ------------------------------------------
# A malformed trace context costs the record its span and exemplars, never its metrics: it is
# ignored and counted by reason (specdec.sidecar.trace_contexts.ignored).
MAX_TRACE_STATE_CHARS = 512  # W3C trace context: longer tracestate values may be dropped
MAX_REQUEST_ID_LEN = 128  # the service's own limit on request ids
OPERATION_NAMES = frozenset({"chat", "text_completion"})
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)

TRACE_REASONS: tuple[str, ...] = (
    "trace_id_invalid",  # not 16 bytes, or all zero
    "span_id_invalid",  # not 8 bytes, or all zero
    "parent_span_id_invalid",  # neither empty nor 8 bytes, or all zero
    "trace_flags_invalid",  # above 0xff
    "trace_state_too_long",  # above MAX_TRACE_STATE_CHARS
    "trace_state_invalid",  # not printable ASCII, or not a W3C tracestate list
    "operation_name_invalid",  # not one of OPERATION_NAMES
    "identity_too_long",  # request_id or instance_id too long to name a span
    "internal_error",  # a bug in the sidecar's span emission; never expected
)


def check_trace(t: telemetry_pb2.RequestTrace, m: metrics_pb2.SpeculativeMetrics) -> str | None:
    """The reason code (a TRACE_REASONS member) why the trace context of a valid record `m`
    cannot make a span, or None. The tracestate's list syntax is checked where it is parsed
    (telemetry/tracing.py)."""
    trace_id = t.trace_id
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        return "trace_id_invalid"
    span_id = t.span_id
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        return "span_id_invalid"
    parent = t.parent_span_id
    if parent and (len(parent) != 8 or parent == _ZERO_SPAN_ID):
        return "parent_span_id_invalid"
    if t.trace_flags > 0xFF:
        return "trace_flags_invalid"
    state = t.trace_state
    if len(state) > MAX_TRACE_STATE_CHARS:
        return "trace_state_too_long"
    if state and not (state.isascii() and state.isprintable()):
        return "trace_state_invalid"
    if t.operation_name not in OPERATION_NAMES:
        return "operation_name_invalid"
    if len(m.request_id) > MAX_REQUEST_ID_LEN or len(m.instance_id) > MAX_IDENTITY_LEN:
        return "identity_too_long"
    return None
