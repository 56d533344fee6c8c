"""bench.diagnostics.launch_cost: its percentiles, and one run on a tiny model (CUDA only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.diagnostics.launch_cost import _percentiles
from testkit.tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_percentiles_of_known_samples() -> None:
    got = _percentiles([float(x) for x in range(1, 101)])  # 1 .. 100 µs
    assert got == {"p50_us": 50.5, "p10_us": 11.0, "p90_us": 91.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_a_tiny_model(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "m")
    out = tmp_path / "launch.json"
    subprocess.run(
        [sys.executable, "-m", "bench.diagnostics.launch_cost", "--model", str(model), "--dtype", "float32",
         "--batches", "1,4", "--widths", "1,3", "--prefill-lengths", "16,40", "--context", "50",
         "--iters", "20", "--uploads", "1,64", "--out", str(out)],
        cwd=REPO, check=True, timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert [(r["batch"], r["width"]) for r in result["decode"]] == [(1, 1), (1, 3), (4, 1), (4, 3)]
    assert [r["prompt_tokens"] for r in result["prefill"]] == [16, 40]
    for row in result["decode"] + result["prefill"]:
        assert 0 < row["p10_us"] <= row["p50_us"] <= row["p90_us"]
    assert [r["values"] for r in result["uploads"]] == [1, 64]
    assert result["decode_graphs"] is True
