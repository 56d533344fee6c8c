"""Soak: the service and the sidecar under mixed load for a stated time.

    python -m bench.soak --seconds 300 --clients 8 --out bench/out/soak_cpu_300s.json

Starts both as child processes (bench/common/stack.py: tiny random model on the CPU, the service
reporting to the sidecar) and runs `--clients` threads, each sending one request after the
other, drawn from a seeded mix:

- short text prompts (4..32 tokens), the server's default speculation (n-gram);
- chat messages, speculation off (method none);
- token-id prompts;
- requests the client cancels after the first chunk;
- invalid requests (a request id over 128 characters): INVALID_ARGUMENT, never admitted.

Every `--sample-seconds` it records both processes' resident memory and open descriptors.
At the end it waits for the reporter to deliver, then compares the sidecar's request count
with the requests the service served (finished + cancelled after admission; invalid ones are
never records). The JSON holds the samples, latency percentiles of the finished requests
(whole request and first chunk), the counts, and the memory/descriptor drift between the
first and the last quarter of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.common.stack import Stack
from specdec.v1 import generation_pb2, generation_pb2_grpc

NONE = 1  # SpeculationMethod.SPECULATION_METHOD_NONE


def make_request(rng: random.Random) -> tuple[str, generation_pb2.GenerateRequest]:
    pick = rng.random()
    max_tokens = rng.randint(4, 32)
    if pick < 0.5:
        return "text", generation_pb2.GenerateRequest(
            text=rng.choice(("The quick brown fox", "def add(x, y):", "Speculative decoding")),
            max_tokens=max_tokens,
        )
    if pick < 0.7:
        req = generation_pb2.GenerateRequest(max_tokens=max_tokens)
        req.messages.messages.add(role="user", content="Tell me about foxes. " * rng.randint(1, 5))
        req.speculation.method = NONE
        return "chat", req
    if pick < 0.85:
        req = generation_pb2.GenerateRequest(max_tokens=max_tokens)
        req.token_ids.ids.extend(rng.randint(1, 300) for _ in range(rng.randint(1, 64)))
        return "token_ids", req
    if pick < 0.95:
        return "cancel", generation_pb2.GenerateRequest(text="A long story: " * 5, max_tokens=256)
    return "invalid", generation_pb2.GenerateRequest(text="x", request_id="r" * 200)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {
        "n": len(values),
        "p50": round(qs[49], 4),
        "p90": round(qs[89], 4),
        "p99": round(qs[98], 4),
        "max": round(max(values), 4),
    }


class Load:
    def __init__(self, address: str, seed: int, clients: int, stop_at: float) -> None:
        self.address, self.seed, self.clients, self.stop_at = address, seed, clients, stop_at
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, code)
        self.latency: list[float] = []
        self.first_chunk: list[float] = []
        self.served = 0  # admitted requests: finished, or cancelled after their first chunk

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with grpc.insecure_channel(self.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            while time.monotonic() < self.stop_at:
                kind, req = make_request(rng)
                started = time.perf_counter()
                first = None
                call = stub.Generate(req, timeout=120)
                code = "OK"
                try:
                    for _response in call:
                        if first is None:
                            first = time.perf_counter() - started
                            if kind == "cancel":
                                call.cancel()
                                break
                except grpc.RpcError as exc:
                    code = exc.code().name
                total = time.perf_counter() - started
                with self.lock:
                    self.outcomes[(kind, code if kind != "cancel" or first is None else "CANCELLED")] += 1
                    if code == "OK" and kind != "cancel":
                        self.served += 1
                        self.latency.append(total)
                        if first is not None:
                            self.first_chunk.append(first)
                    elif kind == "cancel" and first is not None:
                        self.served += 1

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(i,)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def drift(samples: list[dict], process: str, key: str) -> dict:
    """Mean of the first and of the last quarter of the samples (the warm-up excluded from
    neither: the first quarter is the baseline)."""
    values = [s[process][key] for s in samples]
    q = max(1, len(values) // 4)
    first, last = statistics.mean(values[:q]), statistics.mean(values[-q:])
    return {
        "first_quarter": round(first, 1),
        "last_quarter": round(last, 1),
        "max": max(values),
        "growth": round(last - first, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300.0, help="load duration")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=60.0,
        help="at most this long after the load for the sidecar's count to settle",
    )
    p.add_argument("--workdir", type=Path, default=None, help="model and logs (default: a temp dir)")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = p.parse_args(argv)

    with Stack(args.workdir) as stack:
        samples = [{"t": 0.0, **stack.sample()}]
        started = time.monotonic()
        load = Load(stack.service.address, args.seed, args.clients, started + args.seconds)
        runner = threading.Thread(target=load.run)
        runner.start()
        while runner.is_alive():
            runner.join(args.sample_seconds)
            samples.append({"t": round(time.monotonic() - started, 1), **stack.sample()})
        load_seconds = time.monotonic() - started
        deadline = time.monotonic() + args.settle_seconds
        while True:
            counted = stack.sidecar_metrics().get("specdec_requests_total", 0.0)
            if counted >= load.served or time.monotonic() > deadline:
                break
            time.sleep(1)
        metrics = stack.sidecar_metrics()
        samples.append({"t": round(time.monotonic() - started, 1), **stack.sample()})
        service_exit = stack.service.stop()
        sidecar_exit = stack.sidecar.terminate()

    result = {
        "bench": "soak",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(load_seconds, 1),
        "clients": args.clients,
        "seed": args.seed,
        "outcomes": {f"{kind}/{code}": n for (kind, code), n in sorted(load.outcomes.items())},
        "served": load.served,
        "sidecar": {
            name: metrics.get(name, 0.0)
            for name in sorted(metrics)
            if name.startswith(("specdec_requests_total", "specdec_sidecar_records_"))
            and (not name.endswith("}") or metrics[name])
        },
        "counts_equal": metrics.get("specdec_requests_total", 0.0) == load.served,
        "latency_s": percentiles(load.latency),
        "first_chunk_s": percentiles(load.first_chunk),
        "throughput_rps": round(load.served / load_seconds, 2),
        "memory_mib": {proc: drift(samples, proc, "rss_mib") for proc in ("service", "sidecar")},
        "fds": {proc: drift(samples, proc, "fds") for proc in ("service", "sidecar")},
        "exit_codes": {"service": service_exit, "sidecar": sidecar_exit},
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["counts_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
