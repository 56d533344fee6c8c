"""Sidecar configuration: CLI flags, each overriding a SPECDEC_SIDECAR_* environment variable.

Exporter settings that OpenTelemetry standardises (OTLP endpoint, protocol, headers,
timeout, service name, resource attributes) are left to the standard OTEL_* variables and
read by the SDK and exporters themselves; this module only decides *which* exporters run
and the export interval (OTEL_METRIC_EXPORT_INTERVAL, default 5000 ms here, because the
sidecar acknowledges records after the export that contains them).
"""

from __future__ import annotations

import argparse
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specdec_common.settings import Option, add_options, choice, parse_bool
from specdec_security import ServerSecurity
from telemetry.aggregation import TPOT_BUCKETS, TTFT_BUCKETS
from telemetry.dedupe import (
    DEFAULT_MAX_SEQUENCE_JUMP,
    DEFAULT_MAX_SOURCE_BYTES,
    DEFAULT_MAX_SOURCES,
    DEFAULT_SOURCE_IDLE_S,
)
from telemetry.series_budget import (
    DEFAULT_MAX_SERIES,
    DEFAULT_MAX_SERIES_PER_SOURCE,
    SDK_CARDINALITY_LIMIT,
)
from telemetry.validation import DEFAULT_MAX_K

ENV_PREFIX = "SPECDEC_SIDECAR_"
DEFAULT_LISTEN = "127.0.0.1:50052"
DEFAULT_PROMETHEUS = "127.0.0.1:9464"
DEFAULT_EXPORT_INTERVAL_MS = 5000.0
DEFAULT_EXPORT_TIMEOUT_MS = 10000.0
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_SPAN_SERVICE_NAME = "specdec"
EXPORTER_NAMES = ("otlp", "prometheus", "none")
ACK_MODES = ("auto", "export", "aggregate")
MAX_BUCKETS = 64  # boundaries per latency histogram (each is a series per attribute set)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SidecarConfig:
    listen: str = DEFAULT_LISTEN
    exporters: tuple[str, ...] = ("prometheus",)  # resolved: subset of {"otlp", "prometheus"}
    otlp_protocol: str = "grpc"
    prometheus_address: str = DEFAULT_PROMETHEUS
    export_interval_ms: float = DEFAULT_EXPORT_INTERVAL_MS
    export_timeout_ms: float = DEFAULT_EXPORT_TIMEOUT_MS
    ack_mode: str = "aggregate"  # resolved: "export" or "aggregate"
    window_s: float = 60.0
    max_k: int = DEFAULT_MAX_K
    max_sources: int = DEFAULT_MAX_SOURCES
    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES
    source_idle_s: float = DEFAULT_SOURCE_IDLE_S
    max_sequence_jump: int = DEFAULT_MAX_SEQUENCE_JUMP
    max_series: int = DEFAULT_MAX_SERIES
    max_series_per_source: int = DEFAULT_MAX_SERIES_PER_SOURCE
    instance_id: str = ""
    ttft_buckets: tuple[float, ...] = TTFT_BUCKETS
    tpot_buckets: tuple[float, ...] = TPOT_BUCKETS
    shutdown_grace_s: float = 5.0
    log_level: str = "INFO"
    security: ServerSecurity = ServerSecurity()
    tracing: bool = False
    traces_protocol: str = "grpc"
    span_service_name: str = DEFAULT_SPAN_SERVICE_NAME

    @property
    def otlp(self) -> bool:
        return "otlp" in self.exporters

    @property
    def prometheus(self) -> bool:
        return "prometheus" in self.exporters

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> SidecarConfig:
        env = os.environ if environ is None else environ
        args = build_parser(env).parse_args(argv)
        return cls.resolve(args, env)

    @classmethod
    def resolve(cls, args: argparse.Namespace, env: Mapping[str, str]) -> SidecarConfig:
        exporters = _resolve_exporters(args.exporters, env)
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        ).strip()
        if "otlp" in exporters and protocol not in OTLP_PROTOCOLS:
            raise ConfigError(f"OTLP protocol must be grpc or http/protobuf, not {protocol!r}")
        traces_protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        ).strip()
        tracing = args.tracing
        if tracing and traces_protocol not in OTLP_PROTOCOLS:
            raise ConfigError(f"OTLP traces protocol must be grpc or http/protobuf, not {traces_protocol!r}")
        if tracing and not args.span_service_name:
            raise ConfigError("--span-service-name must not be empty")
        ack_mode = args.ack_mode
        if ack_mode == "auto":
            ack_mode = "export" if "otlp" in exporters else "aggregate"
        if ack_mode == "export" and "otlp" not in exporters:
            raise ConfigError("--ack-mode export needs the otlp exporter")
        interval = _float_env(env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_EXPORT_INTERVAL_MS)
        if args.export_interval_ms is not None:
            interval = args.export_interval_ms
        timeout = _float_env(env, "OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_EXPORT_TIMEOUT_MS)
        if interval <= 0 or timeout <= 0:
            raise ConfigError("export interval and timeout must be positive")
        if args.window_seconds <= 0:
            raise ConfigError("--window-seconds must be positive")
        if not 0 <= args.max_k <= 1024:
            raise ConfigError("--max-k must be in 0..1024")
        if args.max_sources < 1:
            raise ConfigError(f"--max-sources must be >= 1, not {args.max_sources}")
        if args.max_source_bytes < 1:
            raise ConfigError(f"--max-source-bytes must be >= 1, not {args.max_source_bytes}")
        if not args.source_idle_seconds > 0:
            raise ConfigError(f"--source-idle-seconds must be positive, not {args.source_idle_seconds}")
        ttft_buckets = parse_buckets(args.ttft_buckets, "--ttft-buckets")
        tpot_buckets = parse_buckets(args.tpot_buckets, "--tpot-buckets")
        if args.max_sequence_jump < 0:
            raise ConfigError(f"--max-sequence-jump must be >= 0, not {args.max_sequence_jump}")
        if not 1 <= args.max_series < SDK_CARDINALITY_LIMIT:
            raise ConfigError(
                f"--max-series must be in 1..{SDK_CARDINALITY_LIMIT - 1} (below "
                f"the OpenTelemetry SDK's {SDK_CARDINALITY_LIMIT} attribute sets "
                f"per instrument), not {args.max_series}"
            )
        if not 1 <= args.max_series_per_source <= args.max_series:
            raise ConfigError(
                f"--max-series-per-source must be in 1..--max-series "
                f"({args.max_series}), not {args.max_series_per_source}"
            )
        _split_address(args.listen, "--listen")
        if "prometheus" in exporters:
            _split_address(args.prometheus_address, "--prometheus-address")
        security = ServerSecurity(
            args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file, args.auth_tokens_file
        )
        problem = security.problem()
        if problem:
            raise ConfigError(problem)
        return cls(
            listen=args.listen,
            exporters=exporters,
            otlp_protocol=protocol,
            prometheus_address=args.prometheus_address,
            export_interval_ms=interval,
            export_timeout_ms=timeout,
            ack_mode=ack_mode,
            window_s=args.window_seconds,
            max_k=args.max_k,
            max_sources=args.max_sources,
            max_source_bytes=args.max_source_bytes,
            source_idle_s=args.source_idle_seconds,
            max_sequence_jump=args.max_sequence_jump,
            max_series=args.max_series,
            max_series_per_source=args.max_series_per_source,
            instance_id=args.instance_id or "",
            ttft_buckets=ttft_buckets,
            tpot_buckets=tpot_buckets,
            shutdown_grace_s=args.shutdown_grace_seconds,
            log_level=args.log_level,
            security=security,
            tracing=tracing,
            traces_protocol=traces_protocol,
            span_service_name=args.span_service_name,
        )


def format_buckets(bounds: Sequence[float]) -> str:
    return ",".join(f"{b:g}" for b in bounds)


def parse_buckets(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated histogram bucket boundaries in seconds: 1 to MAX_BUCKETS finite
    numbers above 0, strictly increasing."""
    parts = [p.strip() for p in text.split(",")]
    try:
        bounds = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers of seconds, not {text!r}") from None
    if not 1 <= len(bounds) <= MAX_BUCKETS:
        raise ConfigError(f"{flag} must have 1 to {MAX_BUCKETS} boundaries, not {len(bounds)}")
    bad = [b for b in bounds if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ConfigError(
            f"{flag}: every boundary must be a finite number of seconds above 0, not {bad[0]!r}"
        )
    for low, high in zip(bounds, bounds[1:]):
        if high <= low:
            raise ConfigError(f"{flag} must be strictly increasing: {high:g} follows {low:g}")
    return bounds


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of milliseconds, not {raw!r}") from None


def _resolve_exporters(value: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """'auto': the standard OTEL_METRICS_EXPORTER if set, else otlp when an OTLP endpoint
    variable is set and prometheus otherwise (the embedded default)."""
    if value == "auto":
        value = env.get("OTEL_METRICS_EXPORTER", "").strip()
        if not value:
            return ("otlp",) if any(env.get(v) for v in OTLP_ENDPOINT_VARS) else ("prometheus",)
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    bad = [n for n in names if n not in EXPORTER_NAMES]
    if bad or not names:
        raise ConfigError(
            f"unknown exporter(s) {bad or value!r}; use a comma-separated subset of {EXPORTER_NAMES} or auto"
        )
    return tuple(n for n in names if n != "none")


def _split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{flag} must be HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def split_address(address: str) -> tuple[str, int]:
    return _split_address(address, "address")


def default_instance_id() -> str:
    return f"sidecar-{uuid.uuid4().hex[:12]}"


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _optional_float(value: str) -> float | None:
    return float(value) if value.strip() else None


OPTIONS: tuple[Option, ...] = (
    Option("listen", _env("listen"), str, DEFAULT_LISTEN, "ingest gRPC address HOST:PORT (port 0 picks one)"),
    Option(
        "exporters",
        _env("exporters"),
        str,
        "auto",
        "comma-separated subset of otlp,prometheus,none, or auto: $OTEL_METRICS_EXPORTER if set, "
        "else otlp when OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT is set, else prometheus",
    ),
    Option(
        "prometheus_address",
        _env("prometheus_address"),
        str,
        DEFAULT_PROMETHEUS,
        "Prometheus scrape endpoint HOST:PORT (when the prometheus exporter is on)",
    ),
    Option(
        "export_interval_ms",
        _env("export_interval_ms"),
        _optional_float,
        None,
        f"OTLP export interval in ms; unset: $OTEL_METRIC_EXPORT_INTERVAL or {DEFAULT_EXPORT_INTERVAL_MS:g}",
    ),
    Option(
        "ack_mode",
        _env("ack_mode"),
        choice(*ACK_MODES),
        "auto",
        "when records are acknowledged to the reporter: export = after the OTLP export that "
        "included them succeeded (nothing lost on a crash); aggregate = once aggregated in "
        "memory; auto = export if OTLP is on",
    ),
    Option(
        "window_seconds",
        _env("window_seconds"),
        float,
        60.0,
        "sliding window of the acceptance-rate/length gauges",
    ),
    Option(
        "max_k",
        _env("max_k"),
        int,
        DEFAULT_MAX_K,
        "largest num_draft_tokens accepted; larger records are rejected",
    ),
    Option(
        "max_sources",
        _env("max_sources"),
        int,
        DEFAULT_MAX_SOURCES,
        "sources whose dedupe watermark is remembered (the least recently active are forgotten first)",
    ),
    Option(
        "max_source_bytes",
        _env("max_source_bytes"),
        int,
        DEFAULT_MAX_SOURCE_BYTES,
        "approximate memory of the dedupe table (source ids plus 200 bytes per source); beyond it "
        "the least recently active sources are forgotten",
    ),
    Option(
        "source_idle_seconds",
        _env("source_idle_seconds"),
        float,
        DEFAULT_SOURCE_IDLE_S,
        "a source that sent nothing for this long is forgotten; records it resends later are counted again",
    ),
    Option(
        "ttft_buckets",
        _env("ttft_buckets"),
        str,
        format_buckets(TTFT_BUCKETS),
        "bucket boundaries (seconds, comma-separated, increasing) of "
        "gen_ai.server.time_to_first_token; finer than the GenAI conventions' recommendation on "
        "purpose (docs/metrics.md, Latency buckets)",
    ),
    Option(
        "tpot_buckets",
        _env("tpot_buckets"),
        str,
        format_buckets(TPOT_BUCKETS),
        "bucket boundaries (seconds, comma-separated, increasing) of "
        "gen_ai.server.time_per_output_token; finer than the GenAI conventions' recommendation on "
        "purpose (docs/metrics.md, Latency buckets)",
    ),
    Option(
        "max_sequence_jump",
        _env("max_sequence_jump"),
        int,
        DEFAULT_MAX_SEQUENCE_JUMP,
        "a record of a known source may be at most this far ahead of the source's last processed "
        "sequence, beyond the records it says were dropped in between (dropped_before); a record "
        "further ahead is rejected (reason sequence_jump) and does not move the watermark",
    ),
    Option(
        "max_series",
        _env("max_series"),
        int,
        DEFAULT_MAX_SERIES,
        "label budget: a new identity (model, method, draft model, k) is aggregated only while the "
        "identities' k + 1 series summed stay within this (the SDK folds series beyond 2000 per "
        "instrument into an unlabelled overflow series); its records are rejected otherwise "
        "(reason series_limit)",
    ),
    Option(
        "max_series_per_source",
        _env("max_series_per_source"),
        int,
        DEFAULT_MAX_SERIES_PER_SOURCE,
        "the part of --max-series one source may add (reason source_series_limit)",
    ),
    Option(
        "instance_id",
        _env("instance_id"),
        str,
        "",
        "the sidecar's service.instance.id resource attribute; empty: service.instance.id from "
        "OTEL_RESOURCE_ATTRIBUTES, else a random id",
    ),
    Option(
        "shutdown_grace_seconds",
        _env("shutdown_grace_seconds"),
        float,
        5.0,
        "on SIGTERM/SIGINT: time for the final export and open streams",
    ),
    Option(
        "tls_cert_file",
        _env("tls_cert_file"),
        str,
        "",
        "PEM certificate chain of the ingest server; with --tls-key-file: TLS (empty: plaintext)",
    ),
    Option("tls_key_file", _env("tls_key_file"), str, "", "private key of --tls-cert-file"),
    Option(
        "tls_client_ca_file",
        _env("tls_client_ca_file"),
        str,
        "",
        "PEM CA bundle; set: mutual TLS, reporters must present a certificate it signed",
    ),
    Option(
        "auth_tokens_file",
        _env("auth_tokens_file"),
        str,
        "",
        "file of accepted bearer tokens, one per line, reloaded on SIGHUP; set: every RPC but "
        "health needs one (empty: no token check)",
    ),
    Option(
        "tracing",
        _env("tracing"),
        parse_bool,
        False,
        "emit one span per request whose service sent its trace context (service --tracing), over "
        "OTLP (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _PROTOCOL, _HEADERS; OTEL_TRACES_SAMPLER; "
        "OTEL_BSP_*), and put exemplars with its trace id on the histograms (docs/tracing.md)",
    ),
    Option(
        "span_service_name",
        _env("span_service_name"),
        str,
        DEFAULT_SPAN_SERVICE_NAME,
        "service.name of the request spans' resource (the inference service they describe; "
        "service.instance.id is the record's instance_id)",
    ),
    Option("log_level", _env("log_level"), str, "INFO", "log level"),
)


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag or variable as ConfigError, like every other configuration problem."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = _Parser(
        prog="specdec-sidecar",
        description="Telemetry sidecar: ingests SpeculativeMetrics over gRPC "
        "(specdec.v1.TelemetryService), validates and dedupes them, aggregates "
        "with the OpenTelemetry SDK and exports over OTLP and/or a Prometheus "
        "scrape endpoint. Every flag overrides the SPECDEC_SIDECAR_* variable "
        "named in its help. OTLP itself is configured by the standard OTEL_* "
        "variables (OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT, _PROTOCOL "
        "grpc|http/protobuf, _HEADERS, _TIMEOUT, OTEL_METRIC_EXPORT_INTERVAL, "
        "OTEL_METRIC_EXPORT_TIMEOUT, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES).",
    )
    add_options(parser, OPTIONS, env)
    return parser
