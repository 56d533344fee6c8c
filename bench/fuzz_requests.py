"""The fuzz cases of tests/security/test_fuzz.py, longer and over several seeds, against the
service and the sidecar as real child processes (bench/common/stack.py: tiny random model, CPU).

    python -m bench.fuzz_requests --seeds 1 2 3 --generate-cases 1000 --report-streams 300 \
        --budget-seconds 60 --out bench/results/fuzz_requests_cpu.json

For each seed: `--generate-cases` hostile Generate calls (4 at a time, 3 s deadline each)
and `--report-streams` Report streams of 8 hostile batches, each within `--budget-seconds`.
After each phase both processes must still serve (health, one real request); the JSON holds
the status codes seen, every finding (a code outside the allowed set, with the seed and case
that reproduce it), and both processes' memory and descriptors before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.common.stack import Stack
from specdec.v1 import generation_pb2, generation_pb2_grpc
from testkit.fuzz import fuzz_generate, fuzz_report
from testkit.processes import health_serving


def serves(stack: Stack) -> bool:
    with grpc.insecure_channel(stack.service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        final = list(stub.Generate(generation_pb2.GenerateRequest(text="hello", max_tokens=2), timeout=60))[
            -1
        ]
    return final.final.completion_tokens == 2 and health_serving(stack.sidecar.address, 5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--generate-cases", type=int, default=1000)
    p.add_argument("--report-streams", type=int, default=300)
    p.add_argument("--budget-seconds", type=float, default=60.0, help="per seed and path")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    runs = []
    with Stack(args.workdir) as stack:
        before = stack.sample()
        for seed in args.seeds:
            generate = fuzz_generate(
                stack.service.address, seed, args.generate_cases, args.budget_seconds
            ).summary()
            generate["serving_after"] = serves(stack)
            report = fuzz_report(
                stack.sidecar.address, seed, args.report_streams, args.budget_seconds
            ).summary()
            report["serving_after"] = serves(stack)
            runs.append({"seed": seed, "generate": generate, "report": report, "processes": stack.sample()})
            print(json.dumps(runs[-1]), flush=True)
        metrics = stack.sidecar_metrics()
        after = stack.sample()
    findings = [f for r in runs for path in ("generate", "report") for f in r[path]["findings"]]
    serving = all(r[path]["serving_after"] for r in runs for path in ("generate", "report"))
    result = {
        "bench": "fuzz_requests",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "command": "python -m bench.fuzz_requests " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": {
            "generate": sum(r["generate"]["cases"] for r in runs),
            "report_streams": sum(r["report"]["cases"] for r in runs),
        },
        "findings": findings,
        "serving_after_every_phase": serving,
        "processes_before": before,
        "processes_after": after,
        "sidecar_records": {
            k: v for k, v in sorted(metrics.items()) if k.startswith("specdec_sidecar_records_") and v
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0 if not findings and serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
