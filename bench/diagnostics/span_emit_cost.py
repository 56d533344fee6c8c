"""Where a traced record's sidecar CPU goes: making its span vs. encoding it for OTLP.

In one process, `telemetry.tracing.RequestSpans.emit` is run on valid records with sampled
trace contexts, twice: with an exporter that drops the spans (the SDK's span work only), and
with one that encodes them exactly as the OTLP exporters do (`encode_spans` to protobuf
bytes) but sends nothing. CPU time of this process per record. Prints one JSON object.

    .venv/bin/python -m bench.diagnostics.span_emit_cost [--records 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from specdec.v1 import telemetry_pb2
from telemetry.tracing import RequestSpans
from testkit.simulated_metrics import simulate_metrics

REPO = Path(__file__).resolve().parents[2]


class _Exporter(SpanExporter):
    def __init__(self, encode: bool) -> None:
        self.encode, self.spans, self.bytes = encode, 0, 0

    def export(self, spans) -> SpanExportResult:
        if self.encode:
            self.bytes += len(encode_spans(spans).SerializeToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    args = ap.parse_args()
    # the batch processor's queue must hold every span: nothing is dropped
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(args.records + 1)
    rng = random.Random(0)
    records = [simulate_metrics(rng, instance_id="svc", passes=24) for _ in range(args.records)]
    traces = [
        telemetry_pb2.RequestTrace(
            trace_id=rng.getrandbits(128).to_bytes(16, "big") or b"\1" * 16,
            span_id=rng.getrandbits(64).to_bytes(8, "big") or b"\1" * 8,
            parent_span_id=rng.getrandbits(64).to_bytes(8, "big") or b"\1" * 8,
            trace_flags=1,
            operation_name="chat",
            max_tokens=256,
            temperature=0.7,
        )
        for _ in records
    ]
    out: dict = {
        "bench": "span_emit_cost",
        "records": args.records,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    for name, encode in (("span_only", False), ("span_and_otlp_encoding", True)):
        exporter = _Exporter(encode)
        spans = RequestSpans(exporter=exporter, span_service_name="specdec", on_ignored=lambda reason: None)
        c0 = time.process_time()
        for m, t in zip(records, traces):
            spans.emit(m, t)
        spans.shutdown(60_000)  # exports what is queued: counted in the CPU time
        cpu = time.process_time() - c0
        assert exporter.spans == args.records, exporter.spans
        out[name] = {
            "cpu_us_per_record": round(cpu / args.records * 1e6, 1),
            "otlp_bytes_per_span": round(exporter.bytes / args.records) if encode else None,
        }
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
