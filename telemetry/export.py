"""Export set-up: the MeterProvider, its resource, and the readers (OTLP push, Prometheus pull).

OTLP exporters are built with no arguments except temporality, so endpoint, headers,
timeout, TLS and compression come from the standard OTEL_* variables, parsed by the exporters
themselves. The protocol (grpc or http/protobuf) picks the exporter class.

`AckingPeriodicReader` replaces the SDK's PeriodicExportingMetricReader for OTLP: it takes a
snapshot of the per-source processed watermarks and collects the SDK's state atomically with
respect to ingest (under the aggregation lock, so a batch is either wholly in a collection or
wholly outside it), exports, counts failures, and on success reports the snapshot as durable:
those are the records the sidecar may now acknowledge.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    TraceBasedExemplarFilter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource

from telemetry.config import SidecarConfig, default_instance_id, split_address

log = structlog.get_logger(__name__)

CUMULATIVE = {
    kind: AggregationTemporality.CUMULATIVE
    for kind in (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}
DEFAULT_SERVICE_NAME = "specdec-sidecar"

Marks = dict[str, int]


def build_resource(instance_id: str) -> Resource:
    """Resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (read by the SDK), with
    service.name defaulting to specdec-sidecar and service.instance.id to `instance_id`
    (explicit), else the one in OTEL_RESOURCE_ATTRIBUTES, else a random id."""
    detected = Resource.create()
    attrs: dict[str, str] = {}
    name = detected.attributes.get(SERVICE_NAME, "")
    if not name or str(name).startswith("unknown_service"):
        attrs[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if instance_id:
        attrs[SERVICE_INSTANCE_ID] = instance_id
    elif SERVICE_INSTANCE_ID not in detected.attributes:
        attrs[SERVICE_INSTANCE_ID] = default_instance_id()
    return detected.merge(Resource(attrs))


def build_otlp_exporter(protocol: str) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:  # config.py validates; keep the message if someone builds one by hand
        raise ValueError(f"unsupported OTLP protocol {protocol!r}")
    return OTLPMetricExporter(preferred_temporality=CUMULATIVE)


class AckingPeriodicReader(MetricReader):
    """Periodic push reader whose successful exports release acknowledgements.

    lock: the aggregation lock (the ingest holds it while it aggregates a batch and advances
    the processed watermarks). snapshot(): the processed watermarks, read under the lock.
    on_exported(marks): called after a successful export with the snapshot it covered.
    on_failure(): called after a failed export (the self-metric).
    """

    def __init__(
        self,
        exporter: MetricExporter,
        *,
        interval_ms: float,
        timeout_ms: float,
        lock: threading.Lock,
        snapshot: Callable[[], Marks],
        on_exported: Callable[[Marks], None],
        on_failure: Callable[[], None],
    ) -> None:
        super().__init__(preferred_temporality=CUMULATIVE)
        self._exporter = exporter
        self._interval_s = interval_ms / 1e3
        self._timeout_ms = timeout_ms
        self._agg_lock = lock
        self._snapshot = snapshot
        self._on_exported = on_exported
        self._on_failure = on_failure
        self._export_lock = threading.Lock()  # one export at a time (ticker vs. final)
        self._holding = False
        self._result: bool | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.exports_failed = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._ticker, name="sidecar-otlp-export", daemon=True)
            self._thread.start()

    def _ticker(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.export_now()
            except Exception:  # never let the ticker die
                log.exception("export_tick_failed")

    def export_now(self, timeout_ms: float | None = None) -> bool:
        """Collect, export and (on success) release the acknowledgements. Thread-safe."""
        timeout_ms = self._timeout_ms if timeout_ms is None else timeout_ms
        with self._export_lock:
            self._result = None
            self._agg_lock.acquire()
            self._holding = True
            try:
                marks = self._snapshot()
                self.collect(timeout_millis=timeout_ms)  # -> _receive_metrics
            except Exception:
                log.exception("metric_collection_failed")
                self._result = False
            finally:
                if self._holding:
                    self._holding = False
                    self._agg_lock.release()
            ok = bool(self._result)
            if ok:
                self._on_exported(marks)
            else:
                self.exports_failed += 1
                self._on_failure()
            return ok

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        # The SDK state is collected: let ingest continue while the export is on the wire.
        if self._holding:
            self._holding = False
            self._agg_lock.release()
        try:
            result = self._exporter.export(metrics_data, timeout_millis=timeout_millis)
            self._result = result is MetricExportResult.SUCCESS
            if not self._result:
                log.warning("metric_export_failed", result=str(result))
        except Exception as exc:
            log.warning("metric_export_raised", error=repr(exc))
            self._result = False

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.export_now(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_millis / 1e3)
        try:
            self._exporter.shutdown(timeout_millis=timeout_millis)
        except TypeError:
            self._exporter.shutdown()


class PrometheusEndpoint:
    """The embedded scrape endpoint: an OTel PrometheusMetricReader on its own registry,
    served by prometheus_client's HTTP server (GET /metrics)."""

    def __init__(self, address: str) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = split_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.reader = PrometheusMetricReader(registry=self.registry)
        self._httpd, self._thread = start_http_server(port, addr=host or "127.0.0.1", registry=self.registry)
        self.host = host or "127.0.0.1"
        self.port = self._httpd.server_address[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ExportSetup:
    """The MeterProvider with its readers, built from a SidecarConfig."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        views: list,
        lock: threading.Lock,
        snapshot: Callable[[], Marks],
        on_exported: Callable[[Marks], None],
        on_failure: Callable[[str], None],
    ) -> None:
        self.resource = build_resource(config.instance_id)
        readers: list[MetricReader] = []
        self.otlp_reader: AckingPeriodicReader | None = None
        self.prometheus: PrometheusEndpoint | None = None
        if config.otlp:
            self.otlp_reader = AckingPeriodicReader(
                build_otlp_exporter(config.otlp_protocol),
                interval_ms=config.export_interval_ms,
                timeout_ms=config.export_timeout_ms,
                lock=lock,
                snapshot=snapshot,
                on_exported=on_exported,
                on_failure=lambda: on_failure("otlp"),
            )
            readers.append(self.otlp_reader)
        if config.prometheus:
            self.prometheus = PrometheusEndpoint(config.prometheus_address)
            readers.append(self.prometheus.reader)
        # Exemplars only carry something when the sidecar emits request spans: then a traced
        # record's histogram values are recorded in its span's context (docs/tracing.md).
        exemplar_filter = TraceBasedExemplarFilter() if config.tracing else AlwaysOffExemplarFilter()
        self.provider = MeterProvider(
            metric_readers=readers, resource=self.resource, views=views, exemplar_filter=exemplar_filter
        )
        self.meter = self.provider.get_meter("specdec.telemetry")

    def start(self) -> None:
        if self.otlp_reader is not None:
            self.otlp_reader.start()

    def final_export(self, timeout_ms: float) -> bool | None:
        """One last OTLP export (None when OTLP is off)."""
        if self.otlp_reader is None:
            return None
        return self.otlp_reader.export_now(timeout_ms)

    def shutdown(self, timeout_ms: float = 5000) -> None:
        try:
            self.provider.shutdown(timeout_millis=timeout_ms)
        except Exception:
            log.exception("meter_provider_shutdown_failed")
        if self.prometheus is not None:
            self.prometheus.close()
