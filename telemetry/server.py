"""The sidecar process: build, add servicers, start, wait; graceful stop with a final export.

    serve(config)          # blocking; SIGTERM/SIGINT stop it gracefully; returns an exit code
    Sidecar(config)        # the async object (tests run it in-process on their own loop)

Graceful stop: health goes NOT_SERVING, ingest stops taking new batches, one final OTLP
export runs and its acknowledgements are written to the open streams, then the gRPC server
stops (grace period) and the meter provider shuts down. Records that arrive after the final
snapshot are not acknowledged, so their reporters resend them to the next sidecar.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from specdec.v1 import telemetry_pb2
from specdec_security import SecuredServer
from specdec_security.reflection import reflection_pool
from telemetry.aggregation import Aggregator, views
from telemetry.config import SidecarConfig
from telemetry.dedupe import SourceTable
from telemetry.export import ExportSetup
from telemetry.ingest import SERVICE_NAME, Ingestor, TelemetryIngest
from telemetry.series_budget import SeriesBudget
from telemetry.tracing import RequestSpans, build_otlp_span_exporter
from telemetry.windows import SlidingWindow

log = structlog.get_logger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # reporters keep an idle stream open and ping it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        # First: it reads and checks the certificate and token files, and a bad one must stop
        # the start before the export threads below exist.
        self.security = SecuredServer(config.security, env_prefix="SPECDEC_SIDECAR_")
        self.lock = threading.Lock()
        self.sources = SourceTable(
            config.max_sources,
            config.max_source_bytes,
            config.source_idle_s,
            on_evict=lambda cause: self.aggregator.count_evicted(cause),
        )
        self.window = SlidingWindow(config.window_s)
        self._ingest: TelemetryIngest | None = None
        ack_after_export = config.ack_mode == "export"
        # The ingest needs the aggregator, which needs the meter, which needs the readers,
        # whose ack callback needs the ingest: late-bound through small lambdas.
        self.export = ExportSetup(
            config,
            views=views(config.max_k, config.ttft_buckets, config.tpot_buckets),
            lock=self.lock,
            snapshot=lambda: self.sources.processed_marks(),
            on_exported=lambda marks: self._ingest.on_exported(marks) if self._ingest else None,
            on_failure=lambda exporter: self.aggregator.count_export_failure(exporter),
        )
        # OTLP is the only exporter whose failures are counted (a scrape has no failure the
        # sidecar could count).
        self.aggregator = Aggregator(
            self.export.meter,
            self.window,
            config.max_k,
            exporters=("otlp",) if config.otlp else (),
            tracing=config.tracing,
        )
        self.spans: RequestSpans | None = None
        if config.tracing:
            self.spans = RequestSpans(
                exporter=build_otlp_span_exporter(config.traces_protocol),
                span_service_name=config.span_service_name,
                on_ignored=self.aggregator.count_trace_ignored,
            )
        self.ingestor = Ingestor(
            self.aggregator,
            self.sources,
            self.lock,
            max_k=config.max_k,
            ack_after_export=ack_after_export,
            spans=self.spans,
            max_sequence_jump=config.max_sequence_jump,
            series=SeriesBudget(config.max_series, config.max_series_per_source),
        )
        self._ingest = TelemetryIngest(self.ingestor)
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self._stopped: asyncio.Event | None = None  # created on the loop in start()
        self._stopping = False

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    @property
    def prometheus_address(self) -> str | None:
        return self.export.prometheus.address if self.export.prometheus else None

    @property
    def instance_id(self) -> str:
        from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID

        return str(self.export.resource.attributes.get(SERVICE_INSTANCE_ID, ""))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._ingest.bind(loop)
        server = grpc.aio.server(interceptors=self.security.interceptors, options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self._ingest.rpc_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
            pool=reflection_pool(telemetry_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR),
        )
        self.port = self.security.add_port(server, self.config.listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.config.listen}")
        await server.start()
        self.server = server
        self.export.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "sidecar_started",
            listen=self.address,
            exporters=list(self.config.exporters),
            prometheus=self.prometheus_address,
            ack_mode=self.config.ack_mode,
            tracing=self.config.tracing,
            export_interval_ms=self.config.export_interval_ms,
            instance_id=self.instance_id,
            **self.security.describe(),
        )

    async def wait(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopping:
            await self.wait()
            return
        self._stopping = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        try:
            await self.health.enter_graceful_shutdown()
            self._ingest.stop_accepting()
            ok = await loop.run_in_executor(None, self.export.final_export, max(1.0, grace_s * 0.8) * 1000)
            if ok is not None:
                log.info("final_export", success=ok)
            # let the stream writers send the acknowledgements the final export released
            for _ in range(20):
                await asyncio.sleep(0.01)
            if self.server is not None:
                await self.server.stop(max(0.1, grace_s * 0.2))
        finally:
            await loop.run_in_executor(None, self.export.shutdown, 2000)
            if self.spans is not None:
                await loop.run_in_executor(None, self.spans.shutdown, 2000)
            log.info("sidecar_stopped")
            self._stopped.set()


async def _run(config: SidecarConfig) -> int:
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task] = []

    def on_signal(signame: str) -> None:
        log.info("signal_received_stopping", signal=signame)
        if not stop_task:
            stop_task.append(loop.create_task(sidecar.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    # SIGHUP re-reads the tokens file; without one it is logged and ignored (never fatal).
    loop.add_signal_handler(signal.SIGHUP, sidecar.security.reload_tokens)
    await sidecar.wait()
    return 0


def serve(config: SidecarConfig) -> int:
    """Run the sidecar until SIGTERM/SIGINT; returns the process exit code."""
    return asyncio.run(_run(config))
