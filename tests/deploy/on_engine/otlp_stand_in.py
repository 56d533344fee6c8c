"""Stand-in for the OpenTelemetry Collector in the deployment test (no image registry here).

Does what deploy/otel-collector.yaml's metrics pipeline does for this stack, and no more:
OTLP/gRPC in on :4317, the latest cumulative value of every series out on :8889 in the
Prometheus text format, named the way the collector's Prometheus exporter names them
(dots to underscores, a unit of seconds as `_seconds`, `{annotation}` units dropped, `_total`
on monotonic sums; `job`/`instance` from service.name/service.instance.id). Series of a
sender that went away stay (the collector keeps them for metric_expiration, 10 min).

Runs in the sidecar image, whose Python has grpcio, opentelemetry-proto and
prometheus_client.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def prometheus_name(name: str, unit: str, monotonic_sum: bool) -> str:
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = "" if unit.startswith("{") else UNIT_SUFFIX.get(unit, "")
    if unit == "1" and not monotonic_sum:
        suffix = "ratio"
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    return base  # CounterMetricFamily adds `_total`


def any_value(v) -> str:
    kind = v.WhichOneof("value")
    return str(getattr(v, kind)) if kind else ""


class Series:
    """(kind, name, labels) -> latest point, over every resource that reported."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.points: dict[tuple, object] = {}
        self.help: dict[str, str] = {}

    def ingest(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            for rm in request.resource_metrics:
                res = {a.key: any_value(a.value) for a in rm.resource.attributes}
                base = (
                    ("job", res.get("service.name", "")),
                    ("instance", res.get("service.instance.id", "")),
                )
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        self._metric(m, base)

    def _metric(self, m, base: tuple) -> None:
        kind = m.WhichOneof("data")
        if kind == "sum":
            points, monotonic = m.sum.data_points, m.sum.is_monotonic
        elif kind == "gauge":
            points, monotonic = m.gauge.data_points, False
        elif kind == "histogram":
            points, monotonic = m.histogram.data_points, False
        else:
            return
        family = ("counter" if monotonic else kind, prometheus_name(m.name, m.unit, monotonic))
        self.help[family[1]] = m.description
        for p in points:
            labels = base + tuple(
                sorted((re.sub(r"[^a-zA-Z0-9_]", "_", a.key), any_value(a.value)) for a in p.attributes)
            )
            if kind == "histogram":
                cumulative, running = [], 0
                for bound, count in zip(list(p.explicit_bounds) + [float("inf")], p.bucket_counts):
                    running += count
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
                value = (cumulative, p.sum)
            else:
                value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
            self.points[family + (labels,)] = value

    def collect(self):
        with self.lock:
            grouped: dict[tuple, list] = {}
            for (kind, name, labels), value in self.points.items():
                grouped.setdefault((kind, name), []).append((labels, value))
            help_text = dict(self.help)
        for (kind, name), rows in grouped.items():
            keys = [k for k, _ in rows[0][0]]
            cls = {
                "counter": CounterMetricFamily,
                "gauge": GaugeMetricFamily,
                "sum": GaugeMetricFamily,
                "histogram": HistogramMetricFamily,
            }[kind]
            family = cls(name, help_text.get(name, ""), labels=keys)
            for labels, value in rows:
                values = [v for _, v in labels]
                if kind == "histogram":
                    family.add_metric(values, buckets=value[0], sum_value=value[1])
                else:
                    family.add_metric(values, value)
            yield family


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, series: Series) -> None:
        self.series = series

    def Export(self, request, context):
        self.series.ingest(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--otlp-grpc", default="0.0.0.0:4317")
    parser.add_argument("--prometheus-port", type=int, default=8889)
    args = parser.parse_args()
    series = Series()
    REGISTRY.register(series)
    start_http_server(args.prometheus_port)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(series), server)
    server.add_insecure_port(args.otlp_grpc)
    server.start()
    # PID 1 in its container: without a handler SIGTERM would be ignored until the kill.
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(f"OTLP/gRPC on {args.otlp_grpc}, Prometheus on :{args.prometheus_port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
