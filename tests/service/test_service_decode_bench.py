"""bench.service_decode end to end on the CPU: the tiny random pair written by bench.random_model
(--write-missing), measured in-process and through a real `specdec-server` child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # the tokenizer comes from SmolLM2's real GGUF file

REPO = Path(__file__).resolve().parents[2]


def run_bench(tmp: Path, device: str, dtype: str) -> dict:
    out = tmp / "bench.json"
    command = [
        sys.executable,
        "-m",
        "bench.service_decode",
        "--sizes",
        "tiny",
        "--models-dir",
        str(tmp / "models"),
        "--write-missing",
        "--device",
        device,
        "--dtype",
        dtype,
        "--methods",
        "none,draft_model",
        "--modes",
        "batch1,burst",
        "--concurrency",
        "2",
        "--prompts",
        "builtin:grounded",
        "--new-tokens",
        "4",
        "--batch1-repeats",
        "1",
        "--burst-rounds",
        "2",
        "--interleave-methods",
        "--warmup",
        "1",
        "--copy-gib",
        "0.0625",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    result["_models"] = tmp / "models"
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_bench(tmp_path_factory.mktemp("service-decode"), "cpu", "float32")


def test_every_point_is_measured_on_both_paths_without_failures(report):
    keys = {(r["path"], r["method"], r["mode"], r["level"]) for r in report["rows"]}
    assert keys == {
        (path, method, mode, level)
        for path in ("inprocess", "grpc")
        for method in ("none", "draft_model")
        for mode, level in (("batch1", 1), ("burst", 2))
    }
    for row in report["rows"]:
        assert row["requests_failed"] == 0
        # A burst of 2 sent in 2 rounds (--burst-rounds), the methods taking turns
        # (--interleave-methods): 4 requests in the method's run, both paths.
        assert row["rounds"] == (2 if row["mode"] == "burst" else 1)
        if row["mode"] == "burst":
            assert row["report"]["requests"]["sent"] == 4
        assert row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert report["runs"][-1]["sizes"]["tiny"]["paths"]["grpc"]["server_exit_status"] == 0


def test_the_grpc_rows_come_from_the_server_with_the_same_greedy_work(report):
    by_key = {(r["path"], r["method"], r["mode"], r["level"]): r["report"] for r in report["rows"]}
    for (path, method, mode, level), rep in by_key.items():
        if path != "grpc":
            continue
        assert rep["server_metrics"]["methods"] == {
            f"SPECULATION_METHOD_{method.upper()}": rep["requests"]["sent"]
        }
        twin = by_key[("inprocess", method, mode, level)]
        # float32 greedy: the same prompts give the same tokens, whichever path sent them.
        for counter in ("prompt_tokens", "completion_tokens"):
            assert rep["server_metrics"][counter] == twin["server_metrics"][counter], (method, mode, counter)


def test_batch1_figures_carry_the_roofline_of_the_measured_bandwidth(report):
    run = report["runs"][-1]
    size = run["sizes"]["tiny"]
    weights = load_file(report["_models"] / "tiny-draft" / "model.safetensors")
    assert size["draft_weight_bytes"] == sum(t.numel() * t.element_size() for t in weights.values())
    roofline = run["bandwidth"]["bytes_per_s"] / size["target_weight_bytes"]
    assert size["roofline_tokens_per_s"] == pytest.approx(roofline)
    for row in report["rows"]:
        if row["level"] == 1:
            assert row["roofline_tokens_per_s"] == pytest.approx(roofline)
            assert row["fraction_of_roofline"] == pytest.approx(row["tokens_per_s"] / roofline)
        else:
            assert "roofline_tokens_per_s" not in row


def test_append_adds_a_run_and_compares_rows_within_a_run_only(report, tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({k: v for k, v in report.items() if k != "_models"}))
    command = [
        sys.executable,
        "-m",
        "bench.service_decode",
        "--sizes",
        "tiny",
        "--models-dir",
        str(report["_models"]),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--paths",
        "inprocess",
        "--methods",
        "none",
        "--modes",
        "batch1",
        "--prompts",
        "builtin:grounded",
        "--new-tokens",
        "4",
        "--batch1-repeats",
        "1",
        "--warmup",
        "0",
        "--copy-gib",
        "0.0625",
        "--append",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    merged = json.loads(out.read_text())
    assert len(merged["runs"]) == 2 and len(merged["rows"]) == len(report["rows"]) + 1
    added = [r for r in merged["rows"] if r["run"] == 1]
    assert [(r["path"], r["method"], r["mode"]) for r in added] == [("inprocess", "none", "batch1")]
    assert merged["summary"]["run 0"] == report["summary"]["run 0"]
    assert list(merged["summary"]["run 1"]) == ["tiny builtin:grounded batch1 1 none inprocess tok/s"]
    assert any(key.endswith("draft_model/plain") for key in merged["summary"]["run 0"])
    assert any(key.endswith("grpc/inprocess") for key in merged["summary"]["run 0"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_in_bfloat16_both_paths_serve_and_the_bandwidth_is_the_devices(tmp_path):
    result = run_bench(tmp_path, "cuda", "auto")
    run = result["runs"][-1]
    assert run["bandwidth"]["bytes_per_s"] > 1e11  # any GPU's memory moves more than 100 GB/s
    assert {r["path"] for r in result["rows"]} == {"inprocess", "grpc"}
    assert all(r["requests_failed"] == 0 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert run["sizes"]["tiny"]["paths"]["grpc"]["server_exit_status"] == 0


def test_the_benchmark_server_runs_this_checkouts_code() -> None:
    """ServerProcess starts `python -m service` from the repository root with it first on
    PYTHONPATH, so an A/B run from another checkout measures that checkout's code, not the
    one an editable install points at."""
    from bench.common import server_process

    assert (server_process.REPO / "service" / "__main__.py").is_file()
    env = server_process.env_with_this_checkout()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(server_process.REPO)


def test_a_model_directory_is_measured_in_place_of_the_sizes(tmp_path) -> None:
    """--model DIR (say SmolLM2 converted in the model cache) replaces --sizes; its draft model
    is used only when draft_model is among the methods."""
    from bench import service_decode

    args = service_decode.parse_args(["--model", str(tmp_path), "--methods", "none,ngram", "--out", "x.json"])
    assert service_decode.model_dirs(args, "model") == (tmp_path, None)
    draft = tmp_path / "draft"
    args = service_decode.parse_args(
        [
            "--model",
            str(tmp_path),
            "--draft-model-dir",
            str(draft),
            "--methods",
            "none,draft_model",
            "--out",
            "x",
        ]
    )
    assert service_decode.model_dirs(args, "model") == (tmp_path, draft)


def test_server_settings_reach_both_paths_through_the_service_arguments(tmp_path) -> None:
    """--linear-blocks, --max-prefill-tokens-per-pass and --prefill-graph-tokens go into the
    service's own arguments, which configure the gRPC server and the in-process engine alike;
    left out, the service's defaults hold."""
    from bench import service_decode
    from service.config import ServiceConfig

    table = tmp_path / "blocks.json"
    args = service_decode.parse_args(
        [
            "--model",
            str(tmp_path),
            "--linear-blocks",
            str(table),
            "--max-prefill-tokens-per-pass",
            "512",
            "--prefill-graph-tokens",
            "0",
        ]
    )
    config = ServiceConfig.from_args(service_decode.server_args(args, tmp_path, None), environ={})
    assert (config.linear_blocks, config.max_prefill_tokens_per_pass, config.prefill_graph_tokens) == (
        str(table),
        512,
        0,
    )
    defaults = ServiceConfig.from_args([], environ={})
    args = service_decode.parse_args(["--model", str(tmp_path)])
    config = ServiceConfig.from_args(service_decode.server_args(args, tmp_path, None), environ={})
    assert (config.linear_blocks, config.max_prefill_tokens_per_pass, config.prefill_graph_tokens) == (
        defaults.linear_blocks,
        defaults.max_prefill_tokens_per_pass,
        defaults.prefill_graph_tokens,
    )


def test_interleaved_methods_take_turns_in_rotated_order(tmp_path) -> None:
    from bench import service_decode
    from service.client.loadgen.prompts import Prompt
    from service.client.loadgen.runner import Pacing

    methods = ["none", "ngram", "draft_model"]
    argv = ["--model", str(tmp_path), "--modes", "batch1,burst", "--concurrency", "4", "--burst-rounds", "3"]
    prompts = {"p": [Prompt(text="a"), Prompt(text="b")]}
    plain = service_decode.blocks(service_decode.parse_args(argv), prompts, methods)
    assert [(m, mode, p.rounds, t) for _, m, mode, p, t in plain] == [
        (m, mode, rounds, None) for mode, rounds in (("batch1", 1), ("burst", 3)) for m in methods
    ]
    turns = service_decode.blocks(
        service_decode.parse_args([*argv, "--interleave-methods"]), prompts, methods
    )
    burst = [(m, p, t) for _, m, mode, p, t in turns if mode == "burst"]
    assert [m for m, _, _ in burst] == [
        "none", "ngram", "draft_model",
        "ngram", "draft_model", "none",
        "draft_model", "none", "ngram",
    ]  # fmt: skip
    assert all(p == Pacing("burst", 4, rounds=1) for _, p, _ in burst)
    assert [t.index for _, _, t in burst] == [0] * 3 + [1] * 3 + [2] * 3 and {
        t.rounds for _, _, t in burst
    } == {3}
    assert [t for _, _, mode, _, t in turns if mode == "batch1"] == [None] * 3  # batch 1 as before
    # Turn r's requests are numbered on from the earlier turns', as one run's rounds are.
    assert [service_decode.first_index(p, t) for _, p, t in burst[::3]] == [0, 4, 8]
    assert service_decode.whole_pacing(Pacing("burst", 4), burst[0][2]).rounds == 3


def test_the_turn_collector_returns_a_method_s_run_once_its_last_turn_is_in() -> None:
    from bench import service_decode
    from service.client.loadgen.stats import RequestRecord

    collector = service_decode.TurnCollector()
    one = [RequestRecord(index=0, client=0, start=1.0, chunk_times=[1.5], chunk_tokens=[2], end=2.0)]
    assert collector.add(("k",), None, 1.0, one) == (1.0, one)  # not interleaved: as it was
    assert collector.add(("k",), service_decode.Turn(0, 2), 1.0, one) is None
    assert collector.add(("other",), service_decode.Turn(0, 2), 1.0, one) is None
    later = [RequestRecord(index=0, client=0, start=5.0, chunk_times=[5.5], chunk_tokens=[2], end=6.0)]
    run_start, records = collector.add(("k",), service_decode.Turn(1, 2), 5.0, later)
    assert run_start == 1.0 and [r.start for r in records] == [1.0, 2.0]  # the gap left out


def test_an_interleaved_level_asks_the_budget_once_and_then_runs_all_its_turns() -> None:
    from bench import service_decode
    from bench.common.time_budget import Budget

    lines: list[str] = []
    spent = Budget(0.0, started=0.0, log=lines.append)  # nothing left
    collector = service_decode.TurnCollector()
    turn = service_decode.Turn(0, 3)
    assert not collector.allowed(("p", "burst", 4), turn, spent, "8b grpc p none burst 4")
    assert not collector.allowed(
        ("p", "burst", 4), service_decode.Turn(1, 3), spent, "8b grpc p ngram burst 4"
    )
    assert (
        spent.skipped == ["8b grpc p none burst 4 and the other methods (3 interleaved turns)"]
        and len(lines) == 1
    )
    assert not collector.allowed(("p", "burst", 8), None, spent, "8b grpc p none burst 8")  # one piece: asks
    assert len(spent.skipped) == 2
    free = Budget(None, started=0.0, log=lines.append)
    started = service_decode.TurnCollector()
    assert started.allowed(("p", "burst", 4), turn, free, "x")
    # Once started, a level runs to its last turn even where the budget has run out since.
    assert started.allowed(("p", "burst", 4), service_decode.Turn(2, 3), spent, "y")
