"""specdec-bench's arithmetic: percentiles, the steady windows, sums and error counts."""

from __future__ import annotations

import pytest

from service.client.loadgen.prompts import PromptSetError, load_prompts
from service.client.loadgen.stats import (
    RequestRecord,
    join_runs,
    percentiles,
    server_sums,
    steady_window,
    summarize,
)
from specdec.v1 import metrics_pb2


def record(
    index: int,
    client: int,
    start: float,
    end: float,
    chunks=(),
    status: str = "OK",
    completion_tokens: int | None = None,
    **counters: int,
) -> RequestRecord:
    times = [t for t, _ in chunks]
    tokens = [n for _, n in chunks]
    metrics = metrics_pb2.SpeculativeMetrics(method=metrics_pb2.SPECULATION_METHOD_NGRAM, **counters)
    return RequestRecord(
        index=index,
        client=client,
        start=start,
        end=end,
        chunk_times=times,
        chunk_tokens=tokens,
        status=status,
        completion_tokens=sum(tokens) if completion_tokens is None else completion_tokens,
        metrics=metrics if status == "OK" else None,
    )


def test_percentiles_interpolate_linearly_between_order_statistics() -> None:
    stats = percentiles(float(v) for v in range(1, 101))
    assert stats["count"] == 100 and stats["mean"] == pytest.approx(50.5)
    # rank (n - 1) * q / 100 from 0: 49.5 -> 50.5, 89.1 -> 90.1, 98.01 -> 99.01
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert percentiles([0.25]) == {"count": 1, "mean": 0.25, "p50": 0.25, "p90": 0.25, "p99": 0.25}
    assert percentiles([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def sustained_run() -> list[RequestRecord]:
    """Two clients, three requests each, back to back; one chunk per 0.1 s of a request."""
    spans = {0: [(0.0, 1.0), (1.0, 2.0), (2.0, 3.5)], 1: [(0.0, 1.5), (1.5, 2.6), (2.6, 3.0)]}
    records = []
    for client, pairs in spans.items():
        for start, end in pairs:
            steps = round((end - start) / 0.1)
            chunks = [(start + 0.1 * (i + 1), 2) for i in range(steps)]
            records.append(record(len(records), client, start, end, chunks))
    return records


def test_sustained_window_runs_from_the_first_end_to_the_last_start_after_an_end() -> None:
    records = sustained_run()
    window = steady_window("sustained", records, run_start=0.0)
    assert (window.start, window.end) == (1.0, 2.6)  # first end; client 1's third start
    report = summarize("sustained", 2, records, run_start=0.0)
    # Chunks every 0.1 s from each of the two clients, 2 tokens each, over (1.0, 2.6].
    expected_tokens = sum(2 for r in records for t in r.chunk_times if 1.0 < t <= 2.6)
    assert expected_tokens == 2 * 2 * 16
    assert report["window"]["tokens"] == expected_tokens
    assert report["window"]["completed_requests"] == 3  # ends at 1.5, 2.0 and 2.6
    assert report["throughput"]["tokens_per_s"] == pytest.approx(expected_tokens / 1.6)
    assert report["throughput"]["requests_per_s"] == pytest.approx(3 / 1.6)
    # Latencies: the requests that started in the window (the first two started in the burst).
    assert report["latency_s"]["requests"] == 4
    assert report["latency_s"]["ttft"]["p50"] == pytest.approx(0.1)
    assert report["latency_s"]["itl"]["p99"] == pytest.approx(0.1)
    assert report["throughput"]["whole_run_seconds"] == pytest.approx(3.5)


def test_one_request_per_client_leaves_no_steady_window_and_says_so() -> None:
    records = [record(0, 0, 0.0, 1.0, [(0.5, 3)]), record(1, 1, 0.0, 2.0, [(1.5, 3)])]
    window = steady_window("sustained", records, run_start=0.0)
    assert (window.start, window.end) == (0.0, 2.0) and window.kind.startswith("whole run")


def test_two_back_to_back_requests_of_one_client_leave_no_steady_window() -> None:
    # The window would run from the first end to the second start: no request ends in it.
    records = [record(0, 0, 0.0, 1.0, [(0.5, 3)]), record(1, 0, 1.0001, 2.0, [(1.5, 3)])]
    window = steady_window("sustained", records, run_start=0.0)
    assert (window.start, window.end) == (0.0, 2.0) and window.kind.startswith("whole run")


def test_burst_and_rate_windows_are_the_whole_run() -> None:
    records = [
        record(0, 0, 0.1, 1.0, [(0.5, 3)]),
        record(1, 1, 0.4, 2.0, [(1.5, 3)]),
        record(2, 2, 0.9, 2.5, [(2.2, 3)]),
    ]
    for mode in ("burst", "rate"):
        window = steady_window(mode, records, run_start=0.0)
        assert (window.start, window.end) == (0.0, 2.5)
    report = summarize("rate", 3.0, records, run_start=0.0)
    assert report["throughput"]["tokens_per_s"] == pytest.approx(9 / 2.5)
    assert report["throughput"]["requests_per_s"] == pytest.approx(3 / 2.5)


def test_joined_runs_leave_out_the_time_between_them() -> None:
    # Two bursts of one method (2 s and 3 s) with 10 s of other work between them.
    first = [record(0, 0, 100.0, 102.0, [(100.5, 1), (102.0, 3)]), record(1, 1, 100.0, 101.0, [(100.2, 4)])]
    second = [record(0, 0, 112.0, 115.0, [(113.0, 2), (115.0, 2)])]
    run_start, joined = join_runs([(100.0, first), (112.0, second)])
    assert run_start == 100.0
    assert [r.index for r in joined] == [0, 1, 2]
    moved = joined[2]  # the second burst now starts where the first ended (102.0)
    assert (moved.start, moved.chunk_times, moved.end) == (102.0, [103.0, 105.0], 105.0)
    assert moved.ttft == second[0].ttft and moved.chunk_gaps == second[0].chunk_gaps
    report = summarize("burst", 2, joined, run_start)
    assert report["throughput"]["whole_run_seconds"] == pytest.approx(5.0)  # 2 s + 3 s
    assert report["throughput"]["tokens_per_s"] == pytest.approx(12 / 5.0)
    assert report["requests"]["sent"] == 3
    assert join_runs([(100.0, first)]) == (100.0, first)  # one run: as it was
    with pytest.raises(ValueError, match="at least one run"):
        join_runs([])


def test_acceptance_is_a_ratio_of_sums_and_errors_are_counted_per_code() -> None:
    records = [
        record(
            0,
            0,
            0.0,
            1.0,
            [(0.5, 3)],
            verify_passes=5,
            draft_passes=5,
            proposed_drafts=10,
            accepted_drafts=9,
            completion_tokens=3,
        ),
        record(
            1,
            1,
            0.0,
            1.0,
            [(0.5, 4)],
            verify_passes=2,
            draft_passes=1,
            proposed_drafts=2,
            accepted_drafts=0,
            completion_tokens=5,
        ),  # one token fewer streamed than counted
        record(2, 2, 0.0, 0.1, status="RESOURCE_EXHAUSTED"),
        record(3, 3, 0.0, 0.1, status="RESOURCE_EXHAUSTED"),
        record(4, 4, 0.0, 0.1, status="INVALID_ARGUMENT"),
    ]
    sums = server_sums([r for r in records if r.ok])
    assert sums["proposed_drafts"] == 12 and sums["accepted_drafts"] == 9 and sums["verify_passes"] == 7
    assert sums["accept_rate"] == pytest.approx(9 / 12)  # not the mean of 0.9 and 0.0
    assert sums["accept_length"] == pytest.approx((9 + 7) / 7)
    assert sums["methods"] == {"SPECULATION_METHOD_NGRAM": 2}
    report = summarize("burst", 5, records, run_start=0.0)
    assert report["requests"] == {
        "sent": 5,
        "succeeded": 2,
        "failed": 3,
        "token_count_mismatches": 1,
        "errors_by_code": {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 2},
    }


def test_no_proposals_give_no_acceptance_rate() -> None:
    sums = server_sums([record(0, 0, 0.0, 1.0, [(0.5, 3)], verify_passes=2)])
    assert sums["accept_rate"] is None and sums["accept_length"] == 1.0


def test_prompt_sets_builtin_and_file(tmp_path) -> None:
    grounded = load_prompts("builtin:grounded")
    assert len(grounded) == 3 and all(p.messages and p.messages[0][0] == "user" for p in grounded)
    assert len(load_prompts("builtin:all")) == 6
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"text": "hello", "max_tokens": 7}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    first, second = load_prompts(str(path))
    assert (first.text, first.max_tokens) == ("hello", 7)
    assert second.messages == (("user", "hi"),) and second.max_tokens is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"text": "a", "messages": []}', "exactly one of"),
        ('{"prompt": "a"}', "unknown field"),
        ('{"text": "a", "max_tokens": 0}', "max_tokens must be an integer >= 1"),
        ('{"messages": [{"role": "user"}]}', "messages[0]"),
    ],
)
def test_a_bad_prompt_line_is_named(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(PromptSetError, match=rf"bad.jsonl:2: .*{__import__('re').escape(message)}"):
        load_prompts(str(path))


def test_unknown_builtin_set_is_named() -> None:
    with pytest.raises(PromptSetError, match="unknown built-in prompt set 'nope'"):
        load_prompts("builtin:nope")
