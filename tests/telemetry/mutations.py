"""One mutation per invariant: each breaks exactly one invariant of the metrics
contract (docs/metrics-contract.md) (or, where one
invariant is implied by earlier ones, the smallest change that breaks it) of `base_record()`.

`MUTATIONS[name] = (mutate(m), expected reason)`.
"""

from __future__ import annotations

from specdec.v1 import metrics_pb2


def base_record() -> metrics_pb2.SpeculativeMetrics:
    """k = 4, passes (d, a): (4,4) (4,2) (2,1) (0,0) (3,0) (4,3), built pass by pass:
    hist [1,1,1,1,1], proposed_per_position [5,5,4,3], accepted_per_position [4,3,2,1]."""
    k = 4
    passes = [(4, 4), (4, 2), (2, 1), (0, 0), (3, 0), (4, 3)]
    hist, pp, ap = [0] * (k + 1), [0] * k, [0] * k
    for d, a in passes:
        if d:
            hist[a] += 1
            for i in range(d):
                pp[i] += 1
            for i in range(a):
                ap[i] += 1
    verify = len(passes)
    proposed = sum(d for d, _ in passes)
    accepted = sum(a for _, a in passes)
    m = metrics_pb2.SpeculativeMetrics(
        request_id="req-base",
        target_model="tgt-a",
        method=metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL,
        draft_model="draft-x",
        num_draft_tokens=k,
        instance_id="svc",
        verify_passes=verify,
        draft_passes=sum(1 for d, _ in passes if d),
        proposed_drafts=proposed,
        accepted_drafts=accepted,
        accept_rate=accepted / proposed,
        accept_length=(accepted + verify) / verify,
        accept_histogram=hist,
        proposed_per_position=pp,
        accepted_per_position=ap,
        prompt_tokens=17,
        completion_tokens=1 + verify + accepted,
        finish_reason=metrics_pb2.FINISH_REASON_EOS,
        queue_time_seconds=0.01,
        time_to_first_token_seconds=0.05,
        duration_seconds=0.4,
    )
    return m


def _set(**fields):
    def f(m):
        for k, v in fields.items():
            setattr(m, k, v)

    return f


def _arr(name, fn):
    def f(m):
        values = list(getattr(m, name))
        fn(values)
        del getattr(m, name)[:]
        getattr(m, name).extend(values)

    return f


def _clear(name):
    return lambda m: m.ClearField(name)


def _both(*fs):
    def f(m):
        for g in fs:
            g(m)

    return f


def _none_with_k(m):
    m.method = metrics_pb2.SPECULATION_METHOD_NONE
    m.draft_model = ""


def _huge_k(m):
    m.num_draft_tokens = 1_000_000


def _k_zero_with_draft_passes(m):
    """The audit's record: k = 0 claiming three draft passes that proposed nothing."""
    m.method, m.draft_model, m.num_draft_tokens = metrics_pb2.SPECULATION_METHOD_NGRAM, "", 0
    m.draft_passes, m.proposed_drafts, m.accepted_drafts = 3, 0, 0
    for name, values in (
        ("accept_histogram", [3]),
        ("proposed_per_position", []),
        ("accepted_per_position", []),
    ):
        del getattr(m, name)[:]
        getattr(m, name).extend(values)
    m.ClearField("accept_rate")
    m.accept_length = 1.0
    m.completion_tokens = 1 + m.verify_passes


MUTATIONS: dict[str, tuple] = {
    "unknown_method": (_set(method=42), "unknown_method"),
    "unspecified_method": (_set(method=metrics_pb2.SPECULATION_METHOD_UNSPECIFIED), "unspecified_method"),
    "unknown_finish_reason": (_set(finish_reason=42), "unknown_finish_reason"),
    "unspecified_finish_reason": (
        _set(finish_reason=metrics_pb2.FINISH_REASON_UNSPECIFIED),
        "unspecified_finish_reason",
    ),
    "k_zero_with_draft_passes": (_k_zero_with_draft_passes, "drafts_without_num_draft_tokens"),
    # more draft passes than drafts (the histogram and position 0 would trip later checks)
    "draft_passes_exceed_proposed": (_set(verify_passes=40, draft_passes=19), "draft_passes_exceed_proposed"),
    "identity_too_long": (_set(target_model="x" * 300), "identity_too_long"),
    "draft_model_too_long": (_set(draft_model="d" * 257), "identity_too_long"),
    "request_id_too_long": (_set(request_id="r" * 257), "string_too_long"),
    "instance_id_too_long": (_set(instance_id="i" * 100_000), "string_too_long"),
    "k_too_large": (_set(num_draft_tokens=65), "num_draft_tokens_too_large"),
    "huge_k": (_huge_k, "num_draft_tokens_too_large"),
    "none_with_k": (_none_with_k, "num_draft_tokens_without_speculation"),
    "draft_model_without_method": (
        _set(method=metrics_pb2.SPECULATION_METHOD_NGRAM),
        "draft_model_without_draft_method",
    ),
    "histogram_length": (_arr("accept_histogram", lambda v: v.append(0)), "accept_histogram_length"),
    "histogram_short": (_arr("accept_histogram", lambda v: v.pop()), "accept_histogram_length"),
    "proposed_per_position_length": (
        _arr("proposed_per_position", lambda v: v.append(0)),
        "proposed_per_position_length",
    ),
    "accepted_per_position_length": (
        _arr("accepted_per_position", lambda v: v.pop()),
        "accepted_per_position_length",
    ),
    "count_out_of_range": (_set(prompt_tokens=1 << 50), "count_out_of_range"),
    "draft_passes_exceed_verify": (
        # 7 draft passes in 6 verify passes (histogram and position 0 follow along)
        _both(
            _set(draft_passes=7),
            _arr("accept_histogram", lambda v: v.__setitem__(0, v[0] + 2)),
            _arr("proposed_per_position", lambda v: v.__setitem__(0, v[0] + 2)),
            _set(proposed_drafts=20),
        ),
        "draft_passes_exceed_verify_passes",
    ),
    "histogram_sum": (_arr("accept_histogram", lambda v: v.__setitem__(0, v[0] + 1)), "accept_histogram_sum"),
    "histogram_weighted_sum": (
        _arr("accept_histogram", lambda v: (v.__setitem__(1, v[1] - 1), v.__setitem__(2, v[2] + 1))),
        "accept_histogram_weighted_sum",
    ),
    "proposed_per_position_sum": (
        _arr("proposed_per_position", lambda v: v.__setitem__(3, v[3] + 1)),
        "proposed_per_position_sum",
    ),
    "accepted_per_position_sum": (
        _arr("accepted_per_position", lambda v: v.__setitem__(0, v[0] - 1)),
        "accepted_per_position_sum",
    ),
    "accepted_exceeds_proposed_at_position": (
        # pp [5,5,4,3] -> [8,5,4,0]: same sum, position 3 now accepts 1 of 0 proposed
        _arr("proposed_per_position", lambda v: (v.__setitem__(0, v[0] + v[3]), v.__setitem__(3, 0))),
        "accepted_exceeds_proposed_at_position",
    ),
    "accepted_per_position_increasing": (
        _arr(
            "accepted_per_position",
            lambda v: (
                (v.__setitem__(0, v[0] - 1), v.__setitem__(1, v[1] + 1))
                if v[0] == v[1]
                else v.__setitem__(slice(0, 2), [v[1], v[0]])
            ),
        ),
        "accepted_per_position_increasing",
    ),
    # accepted <= proposed and proposed <= k * verify are implied by the per-position
    # invariants checked before them; breaking the totals trips the sums first.
    "accepted_exceeds_proposed": (_set(accepted_drafts=100), "accept_histogram_weighted_sum"),
    "proposed_exceeds_capacity": (_set(verify_passes=4, draft_passes=4), "accept_histogram_sum"),
    "completion_tokens_exceed_bound": (
        lambda m: setattr(m, "completion_tokens", 2 + m.verify_passes + m.accepted_drafts),
        "completion_tokens_exceed_bound",
    ),
    "proposed_per_position_first": (
        _arr("proposed_per_position", lambda v: (v.__setitem__(0, v[0] - 1), v.__setitem__(3, v[3] + 1))),
        "proposed_per_position_first",
    ),
    "accepted_per_position_histogram": (
        # same totals and weighted sum, but position counts no longer match the histogram
        _arr(
            "accept_histogram",
            lambda v: (
                v.__setitem__(1, v[1] + 1),
                v.__setitem__(0, v[0] - 1),
                v.__setitem__(3, v[3] + 1),
                v.__setitem__(4, v[4] - 1),
            ),
        ),
        "accepted_per_position_histogram",
    ),
    "accept_rate_missing": (_clear("accept_rate"), "accept_rate_presence"),
    "accept_rate_wrong": (lambda m: setattr(m, "accept_rate", m.accept_rate + 0.01), "accept_rate_mismatch"),
    "accept_rate_nan": (_set(accept_rate=float("nan")), "accept_rate_mismatch"),
    "accept_rate_old_sglang_formula": (
        # (accepted + passes) / (passes * k): the known-wrong batch formula
        lambda m: setattr(
            m, "accept_rate", (m.accepted_drafts + m.verify_passes) / (m.verify_passes * m.num_draft_tokens)
        ),
        "accept_rate_mismatch",
    ),
    "accept_length_missing": (_clear("accept_length"), "accept_length_presence"),
    "accept_length_wrong": (
        lambda m: setattr(m, "accept_length", m.accept_length * 1.1),
        "accept_length_mismatch",
    ),
    "negative_duration": (_set(duration_seconds=-1.0), "invalid_timing"),
    "nan_queue_time": (_set(queue_time_seconds=float("nan")), "invalid_timing"),
    "inf_ttft": (_set(time_to_first_token_seconds=float("inf")), "invalid_timing"),
    # finite, but a sum of a few would be +Inf in the latency histograms
    "huge_duration": (_set(duration_seconds=1e308), "timing_out_of_range"),
    "duration_beyond_bound": (_set(duration_seconds=1e6 + 1), "timing_out_of_range"),
    "ttft_after_end": (_set(time_to_first_token_seconds=1.0), "timing_order"),
    "queue_after_end": (_set(queue_time_seconds=1.0, time_to_first_token_seconds=0.3), "timing_order"),
    "ttft_missing": (_clear("time_to_first_token_seconds"), "time_to_first_token_missing"),
}


def broken(name: str) -> metrics_pb2.SpeculativeMetrics:
    m = base_record()
    MUTATIONS[name][0](m)
    return m
