"""specdec-bench against a real server over loopback (tiny random model, no EOS, so every
request runs to its max_tokens)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from structlog.testing import capture_logs

from service.client.loadgen.cli import main

COUNTERS = (
    "prompt_tokens",
    "completion_tokens",
    "verify_passes",
    "draft_passes",
    "proposed_drafts",
    "accepted_drafts",
)


def finished_lines(logs: list[dict], prefix: str) -> list[dict]:
    return [e for e in logs if e["event"] == "request_finished" and e["request_id"].startswith(prefix)]


def test_summed_server_metrics_equal_what_the_server_returned(run_service, tmp_path) -> None:
    service = run_service(adaptive_draft_length=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"text": "the cat sat on the mat and the cat sat on the mat and the cat", "max_tokens": 12}\n'
        '{"messages": [{"role": "user", "content": "a b c a b c a b c"}]}\n'
    )
    out = tmp_path / "bench.json"
    with capture_logs() as logs:
        code = main(
            [
                "--target",
                service.address,
                "--prompts",
                str(prompts),
                "--methods",
                "none,ngram",
                "--modes",
                "burst,sustained,rate",
                "--concurrency",
                "1,3",
                "--rate",
                "40",
                "--requests",
                "5",
                "--requests-per-client",
                "2",
                "--burst-rounds",
                "2",
                "--max-tokens",
                "8",
                "-k",
                "3",
                "--warmup",
                "2",
                "--request-id-prefix",
                "lg",
                "--per-request",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["server_info"]["target_model"]
    runs = report["runs"]
    expected_sent = {
        ("burst", 1): 2,  # two rounds (--burst-rounds)
        ("burst", 3): 6,
        ("sustained", 1): 2,
        ("sustained", 3): 6,
        ("rate", 40): 5,
    }
    assert sorted((r["method"], r["mode"], r["level"]) for r in runs) == sorted(
        (m, mode, level) for m in ("none", "ngram") for mode, level in expected_sent
    )
    for run in runs:
        level = f"{run['level']:g}"
        lines = finished_lines(logs, f"lg-{run['method']}-{run['mode']}-{level}-")
        lines = [e for e in lines if "-warmup-" not in e["request_id"]]
        requests = run["requests"]
        assert requests["sent"] == expected_sent[(run["mode"], run["level"])]
        assert requests["succeeded"] == requests["sent"] == len(lines), (run, lines)
        assert requests["failed"] == 0 and requests["errors_by_code"] == {}
        assert requests["token_count_mismatches"] == 0
        sums = run["server_metrics"]
        for name in COUNTERS:
            field = name if name.endswith("_tokens") else name
            from_server = sum(
                e["completion_tokens"]
                if name == "completion_tokens"
                else e["prompt_tokens"]
                if name == "prompt_tokens"
                else e["metrics"][name]
                for e in lines
            )
            assert sums[field] == from_server, (run["method"], run["mode"], run["level"], name)
        assert sums["requests"] == len(lines)
        method = f"SPECULATION_METHOD_{run['method'].upper()}"
        assert sums["methods"] == {method: len(lines)}
        if sums["proposed_drafts"]:
            assert sums["accept_rate"] == pytest.approx(sums["accepted_drafts"] / sums["proposed_drafts"])
        else:
            assert sums["accept_rate"] is None
        # Client-side counts agree with the stream and the per-request records.
        per_request = run["per_request"]
        assert len(per_request) == requests["sent"]
        assert (
            run["throughput"]["whole_run_tokens"]
            == sum(r["streamed_tokens"] for r in per_request)
            == sums["completion_tokens"]
        )
        # The first prompt asks for 12 tokens, the second takes --max-tokens 8 (no EOS: exact).
        assert [r["completion_tokens"] for r in per_request] == [
            12 if r["index"] % 2 == 0 else 8 for r in per_request
        ]
        if run["mode"] == "burst":  # the second round starts once the first has ended
            first, second = per_request[: run["level"]], per_request[run["level"] :]
            assert max(r["end_s"] for r in first) <= min(r["start_s"] for r in second)
        latency = run["latency_s"]
        assert latency["ttft"]["count"] == latency["requests"] >= 1
        assert latency["itl"]["count"] >= latency["requests"]  # >= 2 chunks per request
        assert 0 < latency["ttft"]["p50"] <= latency["ttft"]["p99"]
        assert run["throughput"]["whole_run_tokens_per_s"] > 0
        if run["window"]["kind"] == "first end to last start":
            # A sustained run of two requests a client can have a steady window with no chunk
            # in it (the first requests' ends read together, every chunk before them). The
            # window's arithmetic is tested on set records in test_loadgen_stats.py.
            assert run["throughput"]["tokens_per_s"] >= 0
        else:
            assert run["throughput"]["tokens_per_s"] > 0
        assert run["window"]["tokens"] <= run["throughput"]["whole_run_tokens"]
    ngram = [r for r in runs if r["method"] == "ngram"]
    assert sum(r["server_metrics"]["proposed_drafts"] for r in ngram) > 0  # repetitive prompts


def test_errors_are_counted_per_status_code_and_the_run_goes_on(run_service, tmp_path) -> None:
    # One batch slot and one queue place: of three valid requests sent at once, at least one
    # finds the queue full. Every second prompt asks for more than the server's ceiling.
    service = run_service(max_batch_size=1, max_queue_size=1, max_tokens_limit=2000)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"text": "hello there", "max_tokens": 1000}\n{"text": "hello there", "max_tokens": 2001}\n'
    )
    out = tmp_path / "bench.json"
    code = main(
        [
            "--target",
            service.address,
            "--prompts",
            str(prompts),
            "--methods",
            "none",
            "--modes",
            "burst",
            "--concurrency",
            "6",
            "--out",
            str(out),
            "--per-request",
        ]
    )
    assert code == 0
    (run,) = json.loads(out.read_text())["runs"]
    requests = run["requests"]
    assert requests["sent"] == 6 and requests["succeeded"] + requests["failed"] == 6
    assert requests["errors_by_code"]["INVALID_ARGUMENT"] == 3
    assert requests["errors_by_code"].get("RESOURCE_EXHAUSTED", 0) >= 1
    assert requests["succeeded"] >= 1
    statuses = Counter(r["status"] for r in run["per_request"])
    assert statuses["OK"] == requests["succeeded"]
    assert all("max_tokens" in r["error"] for r in run["per_request"] if r["status"] == "INVALID_ARGUMENT")
    assert run["server_metrics"]["requests"] == requests["succeeded"]


def test_an_unreachable_server_is_a_clear_error(capsys) -> None:
    code = main(["--target", "127.0.0.1:1", "--connect-timeout-s", "1", "--modes", "burst"])
    assert code == 2
    assert "127.0.0.1:1" in capsys.readouterr().err


def test_a_bad_prompt_file_is_a_clear_error(tmp_path, capsys) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("{}\n")
    assert main(["--prompts", str(path)]) == 2
    assert "p.jsonl:1" in capsys.readouterr().err


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(have_matplotlib(), reason="matplotlib is installed (the bench extra)")
def test_plot_without_matplotlib_is_refused_before_any_load(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "127.0.0.1:1", "--plot", "out.png"])
    assert exit_info.value.code == 2
    assert "pip install 'specdec[bench]'" in capsys.readouterr().err


@pytest.mark.skipif(not have_matplotlib(), reason="needs matplotlib (the bench extra)")
def test_plot_is_a_png(run_service, tmp_path) -> None:
    service = run_service()
    png = tmp_path / "bench.png"
    code = main(
        [
            "--target",
            service.address,
            "--prompts",
            "builtin:grounded",
            "--modes",
            "burst",
            "--concurrency",
            "1,2",
            "--max-tokens",
            "4",
            "--out",
            str(tmp_path / "b.json"),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
