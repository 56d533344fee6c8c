"""specdec-client's arguments: out-of-range values are refused by name, before any request."""

from __future__ import annotations

import pytest

from service.client.cli import build_request, parse_args


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--top-k", "-1"], "--top-k"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--max-tokens", "-1"], "--max-tokens"),
        (["-k", "-1"], "-k"),
        (["--concurrency", "0"], "--concurrency"),  # a semaphore of 0 waited forever
        (["--requests", "0"], "--requests"),  # was taken as "use --concurrency"
        (["--top-k", "ten"], "--top-k"),
        (["--request-id", "r" * 129], "--request-id"),
        (["--request-id", "r" * 127, "--requests", "2"], "--request-id"),  # r...r-1 is 129 long
    ],
)
def test_out_of_range_arguments_are_refused_by_name(argv, named, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "hi"])
    assert exit_info.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_in_range_arguments_reach_the_request() -> None:
    args = parse_args(
        ["--top-k", "0", "--seed", str(2**64 - 1), "--max-tokens", "7", "-k", "0", "--concurrency", "2", "hi"]
    )
    request = build_request(args)
    assert request.sampling.top_k == 0 and request.sampling.seed == 2**64 - 1
    assert request.max_tokens == 7 and request.speculation.num_draft_tokens == 0
    assert args.requests is None and args.concurrency == 2


def test_a_request_id_at_the_limit_is_taken() -> None:
    assert parse_args(["--request-id", "r" * 128, "hi"]).request_id == "r" * 128
    assert parse_args(["--request-id", "r" * 126, "--requests", "10", "hi"]).requests == 10
