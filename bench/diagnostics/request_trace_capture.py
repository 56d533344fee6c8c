"""The service's per-request tracing work, against protobuf work every request already does.

With --tracing on, the Generate handler calls service.api.request_trace.capture() once per
request, on the event loop (docs/tracing.md). This times it (with a valid traceparent and
tracestate, and with none, when a trace id is drawn) and, in the same run, a baseline every
request pays with tracing on or off: parsing its GenerateRequest and serializing its
SpeculativeMetrics record for the sidecar. Prints one JSON object.

    .venv/bin/python -m bench.diagnostics.request_trace_capture [--calls 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from service.api.request_trace import capture
from specdec.v1 import generation_pb2
from testkit.simulated_metrics import simulate_metrics

REPO = Path(__file__).resolve().parents[2]

METADATA = (
    ("user-agent", "grpc-python/1.85"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
)


def per_call_us(fn, calls: int) -> float:
    """CPU time of this process per call (the machine may be shared: wall time would count
    waiting for a core)."""
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    req = generation_pb2.GenerateRequest(
        request_id="bench-1",
        max_tokens=256,
        messages={"messages": [{"role": "user", "content": "Write one sentence about the sea."}]},
    )
    req.sampling.temperature = 0.7
    raw_request = req.SerializeToString()
    record = simulate_metrics(random.Random(0), passes=24)

    def baseline() -> None:
        generation_pb2.GenerateRequest.FromString(raw_request)
        record.SerializeToString()

    cases = {
        "baseline_parse_request_and_serialize_record": baseline,
        "capture_with_traceparent": lambda: capture(METADATA, req),
        "capture_without_traceparent": lambda: capture(METADATA[:1], req),
    }
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            runs[name].append(per_call_us(fn, args.calls))
    medians = {name: round(statistics.median(v), 3) for name, v in runs.items()}
    base = medians["baseline_parse_request_and_serialize_record"]
    print(
        json.dumps(
            {
                "bench": "request_trace_capture",
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                },
                "calls": args.calls,
                "repeats": args.repeats,
                "us_per_call_runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
                "us_per_call_median": medians,
                "ratio_to_baseline": {k: round(v / base, 2) for k, v in medians.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
