"""OTLP receivers built from opentelemetry-proto's collector definitions, on free loopback
ports: `OtlpGrpcReceiver` (metrics and spans) and `OtlpHttpReceiver` (metrics). What they got
is in `ExportedMetrics` (counters summed over sidecar incarnations, start_time_unix_nano) and
`ExportedSpans`."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def any_value(v):
    """The Python value of an OTLP AnyValue."""
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs) -> frozenset:
    """OTLP KeyValues as a frozenset of (key, value)."""
    return frozenset((kv.key, any_value(kv.value)) for kv in kvs)


class ExportedMetrics:
    """Everything a receiver got. Counters/histograms are cumulative per sidecar incarnation
    (service.instance.id, start_time_unix_nano); `total` sums each incarnation's last value,
    which is how a backend reading cumulative series across counter resets sees them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def add(self, req) -> None:
        with self.lock:
            self.requests.append(req)

    def points(self):
        """Yield (resource attrs, metric, point kind, point)."""
        with self.lock:
            reqs = list(self.requests)
        for req in reqs:
            for rm in req.resource_metrics:
                res = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        for p in getattr(metric, kind).data_points:
                            yield res, metric, kind, p

    def _latest(self, want_kind: str, name: str | None = None) -> dict:
        latest: dict = {}
        for res, metric, kind, p in self.points():
            if kind != want_kind or (name is not None and metric.name != name):
                continue
            inst = (dict(res).get("service.instance.id"), p.start_time_unix_nano)
            key = (metric.name, attributes(p.attributes), inst)
            prev = latest.get(key)
            if prev is None or p.time_unix_nano >= prev.time_unix_nano:
                latest[key] = p
        return latest

    def counter_totals(self) -> dict:
        """{(name, attrs): sum over incarnations of the last cumulative value}."""
        out: dict = defaultdict(int)
        for (name, attrs, _), p in self._latest("sum").items():
            out[(name, attrs)] += p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
        return dict(out)

    def histogram_totals(self) -> dict:
        """{(name, attrs): (count, sum, bucket_counts, bounds)} summed over incarnations."""
        out: dict = {}
        for (name, attrs, _), p in self._latest("histogram").items():
            c, s, b, bounds = out.get((name, attrs), (0, 0.0, None, tuple(p.explicit_bounds)))
            buckets = list(p.bucket_counts) if b is None else [x + y for x, y in zip(b, p.bucket_counts)]
            out[(name, attrs)] = (c + p.count, s + p.sum, buckets, bounds)
        return out

    def gauges(self) -> dict:
        """{(name, attrs): last value} (over all incarnations, by point time)."""
        last: dict = {}
        for _, metric, kind, p in self.points():
            if kind != "gauge":
                continue
            key = (metric.name, attributes(p.attributes))
            if key not in last or p.time_unix_nano >= last[key].time_unix_nano:
                last[key] = p
        return {
            k: (p.as_double if p.WhichOneof("value") == "as_double" else p.as_int) for k, p in last.items()
        }

    def incarnations(self) -> set:
        """One entry per sidecar process that exported. Start times are per series, not per
        process, so count the series every sidecar creates once, at start-up."""
        return {inst for (_, _, inst) in self._latest("sum", "specdec.sidecar.records.received")}

    def resources(self) -> list[dict]:
        with self.lock:
            return [
                dict(attributes(rm.resource.attributes))
                for req in self.requests
                for rm in req.resource_metrics
            ]


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: ExportedMetrics, fail: Callable[[], bool]) -> None:
        self.store, self.fail = store, fail

    def Export(self, request, context):
        if self.fail():
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver told to fail")
        self.store.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class ExportedSpans:
    """Every span a receiver got: `spans()` -> [(resource attrs dict, span)]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def add(self, req) -> None:
        with self.lock:
            self.requests.append(req)

    def spans(self) -> list:
        with self.lock:
            reqs = list(self.requests)
        return [
            (dict(attributes(rs.resource.attributes)), span)
            for req in reqs
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


def span_attrs(span) -> dict:
    """A span's (or exemplar's) attributes as a dict; arrays as tuples."""
    out = {}
    for kv in span.attributes if hasattr(span, "attributes") else span.filtered_attributes:
        v = any_value(kv.value)
        if kv.value.WhichOneof("value") == "array_value":
            v = tuple(any_value(x) for x in v.values)
        out[kv.key] = v
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: ExportedSpans) -> None:
        self.store = store

    def Export(self, request, context):
        self.store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpGrpcReceiver:
    """OTLP/gRPC metrics and traces receiver on a free loopback port."""

    protocol = "grpc"

    def __init__(self) -> None:
        self.store = ExportedMetrics()
        self.span_store = ExportedSpans()
        self.failing = False
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self.store, lambda: self.failing), self.server
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self.span_store), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}

    def traces_env(self) -> dict[str, str]:
        """Spans to this receiver too, exported at once (no batching delay)."""
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}

    def close(self) -> None:
        self.server.stop(0)


class OtlpHttpReceiver:
    """OTLP/HTTP (protobuf) receiver: POST /v1/metrics."""

    protocol = "http/protobuf"

    def __init__(self) -> None:
        self.store = ExportedMetrics()
        self.failing = False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/metrics" or outer.failing:
                    self.send_response(404 if self.path != "/v1/metrics" else 503)
                    self.end_headers()
                    return
                req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                outer.store.add(req)
                payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
