"""Reporter overhead: throughput of a stand-in request loop with reporting on vs. off.

The stand-in "engine" does a fixed amount of Python work per request (building its
SpeculativeMetrics from a per-pass simulation, plus `--work-us` of busy CPU per request, which
stands for the real decode passes), then either calls `MetricsReporter.report()` (on) or
not (off). Runs alternate off/on `--rounds` times in the same process against a real sidecar
subprocess (Prometheus exporter, ack on aggregation) so that the sender thread's GIL share is
included. Also measures report() latency (mean, p99, max). Prints one JSON object.

    .venv/bin/python -m bench.diagnostics.reporter_overhead [--requests 20000] [--work-us 500] [--rounds 3]

Target (issue 5, service level, measured by the lead with the real service): >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from service.reporting import MetricsReporter
from testkit.processes import free_port, health_serving, wait_for
from testkit.simulated_metrics import simulate_metrics

REPO = Path(__file__).resolve().parents[2]


def spin(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def run(n: int, work_us: float, reporter: MetricsReporter | None, seed: int):
    rng = random.Random(seed)
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        m = simulate_metrics(rng)  # the engine builds the record either way
        spin(work_us)
        if reporter is not None:
            a = time.perf_counter()
            reporter.report(m)
            lat.append(time.perf_counter() - a)
    return n / (time.perf_counter() - t0), lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--work-us", type=float, default=500.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "telemetry",
            "--listen",
            f"127.0.0.1:{port}",
            "--exporters",
            "prometheus",
            "--prometheus-address",
            f"127.0.0.1:{free_port()}",
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        env=env,
    )
    try:
        wait_for(lambda: health_serving(f"127.0.0.1:{port}"), 30, 0.1, "sidecar")
        reporter = MetricsReporter(f"127.0.0.1:{port}", instance_id="bench").start()
        off, on, lat_all = [], [], []
        for r in range(args.rounds):
            off.append(run(args.requests, args.work_us, None, r)[0])
            rate, lat = run(args.requests, args.work_us, reporter, r)
            on.append(rate)
            lat_all += lat
        flushed = reporter.flush(30)
        stats = reporter.stats
        reporter.stop(5)
    finally:
        proc.terminate()
        proc.wait(30)
    lat_all.sort()
    out = {
        "bench": "reporter_overhead",
        "requests_per_round": args.requests,
        "work_us_per_request": args.work_us,
        "rounds": args.rounds,
        "off_requests_per_s": [round(x) for x in off],
        "on_requests_per_s": [round(x) for x in on],
        "ratio_on_over_off_median": round(statistics.median(on) / statistics.median(off), 4),
        "report_latency_us": {
            "mean": round(statistics.fmean(lat_all) * 1e6, 2),
            "p99": round(lat_all[int(len(lat_all) * 0.99)] * 1e6, 2),
            "max": round(lat_all[-1] * 1e6, 1),
        },
        "flushed": flushed,
        "reporter_stats": {
            "sent": stats.sent,
            "acked": stats.acked,
            "dropped": stats.dropped,
            "reconnects": stats.reconnects,
        },
        "target_ratio": 0.99,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
