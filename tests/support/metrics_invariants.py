"""The invariants of docs/metrics-contract.md, as an independent test oracle for any SpeculativeMetrics.

(The sidecar has its own production validator, telemetry/validation.py; tests check
engine and service output against this one, written separately from both.)
"""

from __future__ import annotations

from specdec.v1 import metrics_pb2


def assert_metrics_invariants(m: metrics_pb2.SpeculativeMetrics) -> None:
    """Every contract invariant, for one finished request's SpeculativeMetrics."""
    k = m.num_draft_tokens
    assert m.method in metrics_pb2.SpeculationMethod.values()
    assert m.method != metrics_pb2.SPECULATION_METHOD_UNSPECIFIED
    assert m.finish_reason in metrics_pb2.FinishReason.values()
    assert m.finish_reason != metrics_pb2.FINISH_REASON_UNSPECIFIED
    if k == 0:
        assert m.draft_passes == m.proposed_drafts == m.accepted_drafts == 0
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
    assert m.draft_passes <= m.proposed_drafts  # a draft pass proposes at least one draft
    if k:
        # Identities of the per-pass definitions: every draft pass proposes position 0; the
        # draft at position i is accepted exactly when its pass accepted more than i.
        assert m.proposed_per_position[0] == m.draft_passes
        for i in range(k):
            assert m.accepted_per_position[i] == sum(m.accept_histogram[i + 1:])
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
    assert m.queue_time_seconds >= 0 and m.duration_seconds >= m.queue_time_seconds
    if m.HasField("time_to_first_token_seconds"):
        assert m.queue_time_seconds <= m.time_to_first_token_seconds <= m.duration_seconds
    else:
        assert m.completion_tokens == 0  # a request that emitted tokens has a first-token time
    if m.method == metrics_pb2.SPECULATION_METHOD_NONE:
        assert k == 0
    if m.method != metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL:
        assert m.draft_model == ""
