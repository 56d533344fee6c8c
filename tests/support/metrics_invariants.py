"""The invariants of docs/metrics-contract.md, as an independent test oracle for any SpeculativeMetrics.

(The sidecar has its own production validator, telemetry/validation.py; tests check
engine and service output against this one, written separately from both.)
"""

from __future__ import annotations

from specdec.v1 import metrics_pb2


def assert_metrics_invariants(m: metrics_pb2.SpeculativeMetrics) -> None:
    """Every contract invariant, for one finished request's SpeculativeMetrics."""
    k = m.num_draft_tokens
    assert len(m.accept_histogram) == k + 1
    assert len(m.proposed_per_position) == k
    assert len(m.accepted_per_position) == k
    assert sum(m.accept_histogram) == m.draft_passes
    assert sum(j * c for j, c in enumerate(m.accept_histogram)) == m.accepted_drafts
    assert sum(m.proposed_per_position) == m.proposed_drafts
    assert sum(m.accepted_per_position) == m.accepted_drafts
    for i in range(k):
        assert m.accepted_per_position[i] <= m.proposed_per_position[i]
        if i > 0:
            assert m.accepted_per_position[i] <= m.accepted_per_position[i - 1]
            assert m.proposed_per_position[i] <= m.proposed_per_position[i - 1]
    assert m.accepted_drafts <= m.proposed_drafts <= k * m.verify_passes
    assert m.draft_passes <= m.verify_passes
    # The prefill yields one token, every decode pass a_s + 1 (fewer when a stop cut it short).
    assert m.completion_tokens <= 1 + m.verify_passes + m.accepted_drafts
    if m.proposed_drafts:
        assert m.HasField("accept_rate") and m.accept_rate == m.accepted_drafts / m.proposed_drafts
    else:
        assert not m.HasField("accept_rate")
    if m.verify_passes:
        assert m.HasField("accept_length")
        assert m.accept_length == (m.accepted_drafts + m.verify_passes) / m.verify_passes
    else:
        assert not m.HasField("accept_length")
    assert m.finish_reason != metrics_pb2.FINISH_REASON_UNSPECIFIED
    assert m.queue_time_seconds >= 0 and m.duration_seconds >= m.queue_time_seconds
    if m.HasField("time_to_first_token_seconds"):
        assert m.queue_time_seconds <= m.time_to_first_token_seconds <= m.duration_seconds
    if m.method == metrics_pb2.SPECULATION_METHOD_NONE:
        assert k == 0
    if m.method != metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL:
        assert m.draft_model == ""
