"""bench.diagnostics.front_end_cpu: the split of CPU time into per-request and per-token costs,
and the tool end to end against a real `specdec-server` child process and the bare gRPC
server, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.diagnostics.front_end_cpu import cpu_seconds, split_costs
from testkit.processes import REPO

# A child that, once told to, spends 0.3 s of CPU time in its own thread, then sleeps.
BURNER = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < 0.3:
    pass
print("done", flush=True)
time.sleep(60)
"""


def run(requests: int, tokens: int, a_us: float, b_us: float) -> dict:
    cpu = {"front_end": (a_us * requests + b_us * tokens) / 1e6}
    return {"requests": requests, "tokens": tokens, "cpu_s": cpu}


def test_split_costs_recovers_the_per_request_and_per_token_costs():
    costs = split_costs(run(96, 96, 1200.0, 70.0), run(96, 96 * 64, 1200.0, 70.0))
    assert costs["front_end"]["us_per_request"] == pytest.approx(1200.0)
    assert costs["front_end"]["us_per_token"] == pytest.approx(70.0)


def test_split_costs_needs_the_same_requests_and_more_tokens():
    with pytest.raises(ValueError, match="the same requests"):
        split_costs(run(96, 96, 1.0, 1.0), run(64, 96 * 64, 1.0, 1.0))
    with pytest.raises(ValueError, match="needs more tokens"):
        split_costs(run(96, 96, 1.0, 1.0), run(96, 96, 1.0, 1.0))


def test_cpu_seconds_counts_the_processes_time_on_a_cpu():
    child = subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        before = cpu_seconds(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        burnt = cpu_seconds(child.pid) - before
    finally:
        child.kill()
        child.wait()
    # 0.3 s by the child's own clock, plus the few syscalls around it; not its wait for a CPU.
    assert 0.29 <= burnt < 0.4
    with pytest.raises(ProcessLookupError):
        cpu_seconds(child.pid)


def run_tool(tmp: Path, *extra: str) -> dict:
    out = tmp / "fe.json"
    command = [
        sys.executable, "-m", "bench.diagnostics.front_end_cpu", "--concurrency", "4", "--rounds", "2",
        "--max-tokens", "32", "--pairs", "1", "--out", str(out), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # the tokenizer comes from SmolLM2's real GGUF file
def test_the_service_front_end_and_engine_core_are_measured(tmp_path):
    result = run_tool(tmp_path)
    (pair,) = result["runs"]
    assert pair["short"]["requests"] == pair["long"]["requests"] == 8
    # Greedy on random weights: a request ends at max_tokens unless it happens on the EOS id.
    assert pair["short"]["tokens"] == 8 and pair["long"]["tokens"] > 8 * 16
    # Both processes did measurable work for the long run's further tokens.
    for process in ("front_end", "engine_core"):
        assert pair["long"]["cpu_s"][process] > pair["short"]["cpu_s"][process] > 0
        assert result["median"][process]["us_per_token"] > 0


def test_the_bare_grpc_server_is_measured(tmp_path):
    result = run_tool(tmp_path, "--floor")
    (pair,) = result["runs"]
    assert pair["long"]["tokens"] == 8 * 32
    assert set(result["median"]) == {"front_end"}
    assert pair["long"]["cpu_s"]["front_end"] > pair["short"]["cpu_s"]["front_end"] > 0
