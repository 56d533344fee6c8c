"""bench.draft_speedup end to end on the CPU (a few seconds): a tiny random target and draft
model written as directories, both policies, batch 1 and 2, alpha 0 and 1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from service.engine.execution.linear_blocks import DEFAULT_TABLE, parse_table, table_document
from testkit.tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
ALPHAS = (0.0, 1.0)
BATCHES = (1, 2)
TABLE = {"entries": [{"n": 64, "k": 64, "tiles": {"bm": 32, "bn": 32, "bk": 128, "warps": 4, "stages": 4}}]}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("draft-speedup")
    target = save_tiny_model(tmp / "target", seed=0, with_eos=False)
    draft = save_tiny_model(tmp / "draft", seed=1, layers=1, with_eos=False)
    out = tmp / "out.json"
    table = tmp / "blocks.json"  # read and recorded; on the CPU no invariant kernel runs
    table.write_text(json.dumps(TABLE))
    command = [
        sys.executable,
        "-m",
        "bench.draft_speedup",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--device",
        "cpu",
        "--batches",
        ",".join(map(str, BATCHES)),
        "--alphas",
        ",".join(map(str, ALPHAS)),
        "-k",
        "3",
        "--new-tokens",
        "12",
        "--batch1-prompts",
        "2",
        "--max-prompt-tokens",
        "40",
        "--cost-iters",
        "3",
        "--linear-blocks",
        str(table),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    result["_stdout"] = done.stdout
    return result


def test_every_point_is_measured_with_its_prediction(report):
    points = {(r["policy"], r["batch"], r["alpha"]): r for r in report["points"]}
    assert set(points) == {(p, b, a) for p in ("fixed", "adaptive") for b in BATCHES for a in ALPHAS}
    for row in points.values():
        assert row["tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
        assert math.isclose(row["measured_speedup"], row["tokens_per_s"] / row["plain_tokens_per_s"])
        assert row["predicted_speedup"] > 0 and row["measured_over_predicted"] > 0
        assert row["rows_diverged_from_oracle"] == 0
        assert [a["rows_diverged_from_oracle"] for a in row["attempts"]] == [0]  # no second run needed
        assert math.isclose(row["attempts"][0]["seconds"], row["seconds"])
        if row["policy"] == "fixed":  # the corrected model: a burst waits for its slowest row
            assert row["predicted_slowest_row_steps"] >= row["predicted_mean_row_steps"] > 0
            assert row["predicted_speedup_burst"] > 0 and row["measured_outside_steps_s"] >= 0
        assert row["oracle_rows_refreshed_by_warmup"] in (0, None)  # float32: speculation is exact
        assert row["tokens"] == 12 * (2 if row["batch"] == 1 else row["batch"])
    assert not report["skipped"]
    # One summary line per point, at the end.
    assert report["_stdout"].count(" k=3 alpha=") >= len(points)


def test_fixed_k_acceptance_follows_alpha(report):
    for row in report["points"]:
        if row["policy"] != "fixed":
            continue
        assert row["proposed_drafts"] > 0
        if row["alpha"] == 1.0:
            assert row["accept_rate"] == 1.0 and row["alpha_hat"] == 1.0
            assert row["predicted_tokens_per_pass"] == 4.0  # k + 1
            assert row["accept_length"] > 1.0
        else:
            assert row["accepted_drafts"] == 0 and row["alpha_hat"] == 0.0
            assert row["predicted_tokens_per_pass"] == 1.0


def test_plain_runs_reproduce_the_oracle_and_costs_are_measured(report):
    assert {(r["policy"], r["batch"], r["run"]) for r in report["plain"]} == {
        (p, b, run) for p in ("fixed", "adaptive") for b in BATCHES for run in ("plain before", "plain after")
    }
    assert all(r["rows_not_reproducing_the_oracle"] == 0 for r in report["plain"])
    costs = report["pass_costs"]
    assert {(r["batch"], r["width"]) for r in costs["target"]} == {
        (b, w) for b in BATCHES for w in (1, 2, 3, 4)
    }
    assert {(r["batch"], r["width"]) for r in costs["draft"]} == {(b, w) for b in BATCHES for w in (1, 2)}
    assert all(r["ms"] > 0 for r in costs["target"] + costs["draft"])


def test_the_block_table_is_recorded(report):
    # The file's entries over the committed table's.
    expected = table_document(DEFAULT_TABLE.overridden_by(parse_table(TABLE, "TABLE")))["entries"]
    assert report["linear_blocks"]["table"] == expected
    assert report["linear_blocks"]["file"].endswith("blocks.json")
