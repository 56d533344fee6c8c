"""The telemetry sidecar: ingests SpeculativeMetrics from inference services over gRPC,
validates and dedupes them, aggregates with the OpenTelemetry SDK and exports over OTLP
(and/or a Prometheus scrape endpoint). Entry point: `python -m telemetry` / `specdec-sidecar`.

Modules, one job each: config (flags/env), validation (the invariants of
docs/metrics-contract.md), dedupe (per-source watermarks), aggregation (instruments, Views,
batch sums), windows (sliding-window gauges), export (MeterProvider, OTLP / Prometheus
readers, acknowledgement on export), tracing (request spans from records that carry a trace
context, docs/tracing.md), ingest (the TelemetryService stream), server (process lifecycle).
"""
