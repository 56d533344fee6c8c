"""The sidecar's invariant checks (telemetry.validation.check), one invariant at a time."""

from __future__ import annotations

import random

import pytest

from specdec.v1 import metrics_pb2
from telemetry.validation import REASONS, check
from tests.support.metrics_invariants import assert_metrics_invariants
from tests.telemetry.mutations import MUTATIONS, base_record, broken
from tests.telemetry.support import IDENTITIES, simulate_metrics


def test_base_record_and_simulated_records_are_valid():
    m = base_record()
    assert list(m.accept_histogram) == [1, 1, 1, 1, 1]
    assert list(m.proposed_per_position) == [5, 5, 4, 3]
    assert list(m.accepted_per_position) == [4, 3, 2, 1]
    assert_metrics_invariants(m)
    assert check(m) is None
    rng = random.Random(7)
    for ident in IDENTITIES:
        for _ in range(300):
            rec = simulate_metrics(rng, ident)
            assert_metrics_invariants(rec)  # the independent oracle agrees...
            assert check(rec) is None, (check(rec), rec)  # ...and so does the sidecar


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_broken_invariant_is_named(name):
    m = broken(name)
    reason = MUTATIONS[name][1]
    assert reason in REASONS
    assert check(m) == reason
    # Bounds of the sidecar's configuration, not contract invariants.
    sidecar_only = {
        "identity_too_long",
        "count_out_of_range",
        "k_too_large",
        "huge_k",
        "draft_model_too_long",
        "request_id_too_long",
        "instance_id_too_long",
        "huge_duration",
        "duration_beyond_bound",
    }
    if name not in sidecar_only:
        # the independent oracle (tests/support) agrees the record is invalid
        with pytest.raises(AssertionError):
            assert_metrics_invariants(m)


def test_every_check_reason_is_exercised():
    ingest_only = {
        "invalid_sequence",
        "missing_metrics",
        "missing_source_id",
        "source_id_too_long",
        "sequence_jump",
        "series_limit",
        "source_series_limit",
        "malformed_batch",
        "internal_error",
        # implied by earlier checks, unreachable alone (see mutations.py)
        "accepted_exceeds_proposed",
        "proposed_exceeds_capacity",
        "proposed_per_position_increasing",
    }
    covered = {reason for _, reason in MUTATIONS.values()}
    assert set(REASONS) - ingest_only - covered == set()


def test_k_zero_none_method_is_valid():
    m = metrics_pb2.SpeculativeMetrics(
        target_model="t",
        method=metrics_pb2.SPECULATION_METHOD_NONE,
        num_draft_tokens=0,
        verify_passes=3,
        accept_length=1.0,
        accept_histogram=[0],
        prompt_tokens=2,
        completion_tokens=4,
        finish_reason=metrics_pb2.FINISH_REASON_LENGTH,
        queue_time_seconds=0.0,
        time_to_first_token_seconds=0.1,
        duration_seconds=0.2,
    )
    assert check(m) is None
    assert_metrics_invariants(m)
    m.accept_rate = 0.0  # nothing proposed: accept_rate must be absent, not 0
    assert check(m) == "accept_rate_presence"


def test_garbage_never_raises():
    rng = random.Random(3)
    parsed = 0
    valid = simulate_metrics(rng, IDENTITIES[0], passes=10).SerializeToString()
    for _ in range(3000):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 6)):  # flip random bytes of a valid record
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
        raw = bytes(raw)
        try:
            m = metrics_pb2.SpeculativeMetrics.FromString(raw)
        except Exception:
            continue
        parsed += 1
        check(m)  # any outcome but an exception
    assert parsed > 100
