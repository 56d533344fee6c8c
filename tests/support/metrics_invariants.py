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
            assert m.accepted_per_position[i] == sum(m.accept_histogram[i + 1 :])
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


def stream_draft_flags(chunks) -> tuple[list[bool], int]:
    """(per streamed token: an accepted draft?, cut accepted drafts) from GenerateChunk
    messages, decoded here from the documented wire form (bit i % 8 of byte i / 8, least
    significant bit first), independently of the service's own packing code."""
    flags: list[bool] = []
    cut = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        data = bytes(chunk.draft_mask)
        assert len(data) == (n + 7) // 8, f"draft_mask of {len(data)} bytes for {n} tokens"
        for i in range(n):
            flags.append(bool(data[i // 8] >> (i % 8) & 1))
        for i in range(n, 8 * len(data)):
            assert not data[i // 8] >> (i % 8) & 1, "a draft_mask bit past the chunk's tokens"
        cut += chunk.cut_accepted_drafts
    return flags, cut


def assert_stream_provenance(chunks, m: metrics_pb2.SpeculativeMetrics) -> tuple[list[bool], int]:
    """A finished stream's provenance accounts for its accepted drafts exactly: the tokens
    marked as accepted drafts plus the cut ones equal accepted_drafts. No token of a
    request without drafts is marked, and the first token (the prefill's) never is."""
    flags, cut = stream_draft_flags(chunks)
    assert sum(flags) + cut == m.accepted_drafts, (sum(flags), cut, m.accepted_drafts)
    if flags:
        assert not flags[0], "the prefill's token is the target's own"
    if m.num_draft_tokens == 0:
        assert not any(flags) and cut == 0
    return flags, cut
