"""Sidecar ingest throughput: records/s through real gRPC into a real sidecar process.

The sidecar (`python -m telemetry`) runs pinned to one core (`taskset -c SIDECAR_CPU`), the
load generator to another (`taskset -c LOADGEN_CPU`, applied to this process). The generator
pre-serializes every ReportRequest before timing (valid random records from the per-pass
simulation, `--batch-size` per batch, one stream per source) and then streams them as fast
as the sidecar acknowledges. Prints one JSON object.

    .venv/bin/python -m bench.sidecar_ingest [--records 200000] [--batch-size 256]
        [--streams 4] [--exporter prometheus|otlp] [--sidecar-cpu 1] [--loadgen-cpu 0]
        [--tracing] [--traced-fraction 0.0]
        [--profile]   # also run the in-process hot path under cProfile (no gRPC)

--traced-fraction: the share of records that carry a RequestTrace (a caller's traceparent;
--sampled-fraction of them with the sampled flag); --tracing: the sidecar emits their spans
(OTLP/gRPC to an in-process receiver) and exemplars (docs/tracing.md).

Target (issue 5): >= 50,000 records/s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from service.reporting.reporter import encode_report_request
from specdec.v1 import telemetry_pb2
from specdec_common.proto_names import REPORT_METHOD
from testkit.otlp_receiver import OtlpGrpcReceiver
from testkit.processes import free_port, health_serving, wait_for
from testkit.simulated_metrics import simulate_metrics

REPO = Path(__file__).resolve().parents[1]


def _trace(rng: random.Random, sampled: bool) -> bytes:
    return telemetry_pb2.RequestTrace(
        trace_id=rng.getrandbits(128).to_bytes(16, "big"),
        span_id=rng.getrandbits(64).to_bytes(8, "big"),
        parent_span_id=rng.getrandbits(64).to_bytes(8, "big"),
        trace_flags=int(sampled),
        operation_name="chat",
        max_tokens=256,
        temperature=0.7,
    ).SerializeToString()


def build_batches(
    n_records: int,
    batch_size: int,
    streams: int,
    seed: int = 0,
    traced_fraction: float = 0.0,
    sampled_fraction: float = 1.0,
):
    rng = random.Random(seed)
    pool = [simulate_metrics(rng).SerializeToString() for _ in range(2000)]
    per_stream = n_records // streams
    out = []
    for s in range(streams):
        source = f"bench-{seed}-{s}/{os.getpid()}".encode()
        batches = []
        seq = 0
        while seq < per_stream:
            recs = []
            for _ in range(min(batch_size, per_stream - seq)):
                seq += 1
                trace = (
                    _trace(rng, rng.random() < sampled_fraction) if rng.random() < traced_fraction else b""
                )
                recs.append((seq, pool[rng.randrange(len(pool))], 0, trace))
            batches.append(encode_report_request(source, recs))
        out.append(batches)
    return out, per_stream * streams


def run_stream(channel: grpc.Channel, batches: list[bytes], result: dict) -> None:
    call = channel.stream_stream(
        REPORT_METHOD, request_serializer=None, response_deserializer=telemetry_pb2.ReportResponse.FromString
    )
    accepted = rejected = 0
    for resp in call(iter(batches)):
        accepted += resp.accepted
        rejected += resp.rejected + resp.duplicates
    result["accepted"] = result.get("accepted", 0) + accepted
    result["rejected"] = result.get("rejected", 0) + rejected


def profile_in_process(batches: list[list[bytes]]) -> dict:
    """The synchronous hot path (parse, dedupe, validate, aggregate) without gRPC."""
    import cProfile
    import io
    import pstats

    from telemetry.config import SidecarConfig
    from telemetry.server import Sidecar

    cfg = SidecarConfig.from_args(
        ["--exporters", "prometheus", "--prometheus-address", f"127.0.0.1:{free_port()}"], environ={}
    )
    sc = Sidecar(cfg)
    flat = [b for bs in batches for b in bs]
    t0 = time.perf_counter()
    for b in flat:
        sc.ingestor.process_bytes(b)
    plain = time.perf_counter() - t0
    # parse only
    t0 = time.perf_counter()
    for b in flat:
        telemetry_pb2.ReportRequest.FromString(b)
    parse = time.perf_counter() - t0
    prof = cProfile.Profile()
    sc2 = Sidecar(
        SidecarConfig.from_args(
            ["--exporters", "prometheus", "--prometheus-address", f"127.0.0.1:{free_port()}"], environ={}
        )
    )
    prof.enable()
    for b in flat[: max(1, len(flat) // 4)]:
        sc2.ingestor.process_bytes(b)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    total = sum(len(telemetry_pb2.ReportRequest.FromString(b).records) for b in flat)
    sc.export.shutdown()
    sc2.export.shutdown()
    return {
        "in_process_records_per_s": round(total / plain),
        "parse_only_records_per_s": round(total / parse),
        "profile_top": s.getvalue().splitlines()[:40],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--exporter", choices=("prometheus", "otlp"), default="prometheus")
    ap.add_argument("--sidecar-cpu", default="1")
    ap.add_argument("--loadgen-cpu", default="0")
    ap.add_argument("--tracing", action="store_true")
    ap.add_argument("--traced-fraction", type=float, default=0.0)
    ap.add_argument(
        "--sampled-fraction",
        type=float,
        default=1.0,
        help="of the traced records, the share whose caller's flag says sampled",
    )
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    batches, total = build_batches(
        args.records,
        args.batch_size,
        args.streams,
        traced_fraction=args.traced_fraction,
        sampled_fraction=args.sampled_fraction,
    )
    taskset = shutil.which("taskset")
    if taskset:
        os.sched_setaffinity(0, {int(args.loadgen_cpu)})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPECDEC_LOG_FORMAT": "json"}
    receiver = None
    cmd = [sys.executable, "-m", "telemetry", "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
    if args.exporter == "otlp":
        receiver = OtlpGrpcReceiver()
        env.update(receiver.env())
        cmd += ["--exporters", "otlp"]
    else:
        cmd += ["--exporters", "prometheus", "--prometheus-address", f"127.0.0.1:{free_port()}"]
    if args.tracing:
        receiver = receiver or OtlpGrpcReceiver()
        env.update(receiver.traces_env())
        cmd += ["--tracing", "true"]
    if taskset:
        cmd = [taskset, "-c", args.sidecar_cpu, *cmd]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: health_serving(address), 30, 0.1, "sidecar")
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        # warm-up (attribute caches, SDK storages): one small stream, not timed
        warm, _ = build_batches(2 * args.batch_size, args.batch_size, 1, seed=99)
        run_stream(channel, warm[0], {})
        result: dict = {}
        threads = [threading.Thread(target=run_stream, args=(channel, b, result)) for b in batches]
        cpu0 = _proc_cpu(proc.pid)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        cpu = _proc_cpu(proc.pid) - cpu0
        out = {
            "bench": "sidecar_ingest",
            "records": total,
            "batch_size": args.batch_size,
            "streams": args.streams,
            "exporter": args.exporter,
            "tracing": args.tracing,
            "traced_fraction": args.traced_fraction,
            "sampled_fraction": args.sampled_fraction,
            "pinned": bool(taskset),
            "elapsed_s": round(elapsed, 3),
            "records_per_s": round(total / elapsed),
            "sidecar_cpu_s": round(cpu, 3),
            "records_per_sidecar_cpu_s": round(total / cpu) if cpu else None,
            "accepted": result.get("accepted"),
            "rejected_or_duplicate": result.get("rejected"),
            "target_records_per_s": 50_000,
        }
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)
        if receiver:
            # spans still buffered in the sidecar were flushed at its shutdown
            out_spans = len(receiver.span_store.spans())
            receiver.close()
    if args.tracing:
        out["spans_received"] = out_spans
    if args.profile:
        out.update(profile_in_process(batches))
    print(json.dumps(out, indent=1))


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


if __name__ == "__main__":
    main()
