"""Sidecar configuration: flags override SPECDEC_SIDECAR_* variables; exporter selection."""

from __future__ import annotations

import pytest

from telemetry.__main__ import main
from telemetry.config import ConfigError, SidecarConfig


def cfg(argv=(), **env):
    return SidecarConfig.from_args(list(argv), environ=env)


def test_defaults():
    c = cfg()
    assert c.listen == "127.0.0.1:50052" and c.exporters == ("prometheus",)
    assert c.prometheus_address == "127.0.0.1:9464" and c.ack_mode == "aggregate"
    assert c.export_interval_ms == 5000 and c.window_s == 60 and c.max_k == 64


def test_flag_overrides_env():
    env = {"SPECDEC_SIDECAR_LISTEN": "0.0.0.0:1", "SPECDEC_SIDECAR_WINDOW_SECONDS": "30"}
    assert cfg(**env).listen == "0.0.0.0:1" and cfg(**env).window_s == 30
    c = cfg(["--listen", "127.0.0.1:2", "--window-seconds", "10"], **env)
    assert c.listen == "127.0.0.1:2" and c.window_s == 10


def test_otlp_endpoint_turns_on_otlp_and_export_acks():
    c = cfg(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317")
    assert c.exporters == ("otlp",) and c.ack_mode == "export" and c.otlp_protocol == "grpc"
    c = cfg(
        ["--exporters", "otlp,prometheus"],
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_METRIC_EXPORT_INTERVAL="1500",
    )
    assert c.otlp and c.prometheus and c.otlp_protocol == "http/protobuf"
    assert c.export_interval_ms == 1500 and c.ack_mode == "export"
    assert (
        cfg(
            ["--export-interval-ms", "250"], OTEL_METRIC_EXPORT_INTERVAL="1500", OTEL_METRICS_EXPORTER="otlp"
        ).export_interval_ms
        == 250
    )
    assert cfg(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_OTLP_ENDPOINT="http://x:4317").exporters == (
        "prometheus",
    )


@pytest.mark.parametrize(
    "argv,env",
    [
        (["--exporters", "kafka"], {}),
        (["--ack-mode", "export", "--exporters", "prometheus"], {}),
        (["--exporters", "otlp"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}),
        (["--listen", "nope"], {}),
        ([], {"OTEL_METRIC_EXPORT_INTERVAL": "soon"}),
    ],
)
def test_bad_config(argv, env):
    with pytest.raises(ConfigError):
        cfg(argv, **env)


def test_main_reports_config_errors(capsys):
    assert main(["--exporters", "kafka"]) == 2
    assert "unknown exporter" in capsys.readouterr().err


def test_dedupe_table_bounds_flags_and_variables():
    env = {"SPECDEC_SIDECAR_MAX_SOURCE_BYTES": "4096", "SPECDEC_SIDECAR_SOURCE_IDLE_SECONDS": "90"}
    c = cfg(**env)
    assert c.max_source_bytes == 4096 and c.source_idle_s == 90
    c = cfg(["--max-source-bytes", "8192", "--source-idle-seconds", "30", "--max-sources", "7"], **env)
    assert c.max_source_bytes == 8192 and c.source_idle_s == 30 and c.max_sources == 7
    for argv in (["--max-sources", "0"], ["--max-source-bytes", "0"], ["--source-idle-seconds", "0"]):
        with pytest.raises(ConfigError, match=argv[0]):
            cfg(argv)


def test_latency_buckets_resolve_a_tenth_of_a_millisecond_to_ten_seconds():
    from telemetry.aggregation import SEMCONV_TPOT_BUCKETS, SEMCONV_TTFT_BUCKETS

    c = cfg()
    for bounds, semconv in ((c.ttft_buckets, SEMCONV_TTFT_BUCKETS), (c.tpot_buckets, SEMCONV_TPOT_BUCKETS)):
        assert bounds[0] == 0.0001 and bounds[-1] == 10.0
        assert list(bounds) == sorted(set(bounds))
        assert set(semconv) <= set(bounds)  # a query on a recommended boundary still finds it
    # GPU token times (1-10 ms) in steps of at most 25%.
    band = [b for b in c.tpot_buckets if 0.001 <= b <= 0.01]
    assert all(high / low <= 1.25 + 1e-9 for low, high in zip(band, band[1:]))


def test_latency_buckets_flag_overrides_env():
    env = {"SPECDEC_SIDECAR_TTFT_BUCKETS": "0.001, 0.01", "SPECDEC_SIDECAR_TPOT_BUCKETS": "0.002"}
    c = cfg(**env)
    assert c.ttft_buckets == (0.001, 0.01) and c.tpot_buckets == (0.002,)
    c = cfg(["--ttft-buckets", "0.5,1", "--tpot-buckets", "1e-4,1e-3"], **env)
    assert c.ttft_buckets == (0.5, 1.0) and c.tpot_buckets == (0.0001, 0.001)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.01,0.001", "strictly increasing"),
        ("0.001,0.001", "strictly increasing"),
        ("0,0.1", "above 0"),
        ("-1", "above 0"),
        ("0.1,inf", "finite"),
        ("0.1,nan", "finite"),
        ("fast", "comma-separated numbers"),
        ("", "comma-separated numbers"),
        (",".join(str(i) for i in range(1, 66)), "1 to 64 boundaries"),
    ],
)
def test_bad_latency_buckets_are_refused_by_name(value, message):
    for flag in ("--ttft-buckets", "--tpot-buckets"):
        with pytest.raises(ConfigError, match=message) as info:
            cfg([flag, value])
        assert flag in str(info.value)


def test_the_documented_latency_buckets_are_the_defaults():
    from pathlib import Path

    from telemetry.aggregation import TPOT_BUCKETS, TTFT_BUCKETS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name, bounds in (("time to first token", TTFT_BUCKETS), ("time per output token", TPOT_BUCKETS)):
        assert f"| {name} | {', '.join(f'{b:g}' for b in bounds)} |" in doc, name


def test_tracing_flag_variable_and_traces_protocol():
    c = cfg()
    assert c.tracing is False
    c = cfg(SPECDEC_SIDECAR_TRACING="true", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert c.tracing is True and c.traces_protocol == "http/protobuf"
    c = cfg(["--tracing", "false"], SPECDEC_SIDECAR_TRACING="true")
    assert c.tracing is False
    c = cfg(
        ["--tracing", "true"],
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc",
    )
    assert c.traces_protocol == "grpc" and c.span_service_name == "specdec"
    with pytest.raises(ConfigError, match="--tracing"):
        cfg(["--tracing", "sometimes"])
    with pytest.raises(ConfigError, match="traces protocol"):
        cfg(["--tracing", "true"], OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/json")
    with pytest.raises(ConfigError, match="--span-service-name"):
        cfg(["--tracing", "true", "--span-service-name", ""])


def test_ingest_bounds_flags_and_variables():
    c = cfg()
    assert (c.max_sequence_jump, c.max_series, c.max_series_per_source) == (1_000_000, 500, 200)
    env = {
        "SPECDEC_SIDECAR_MAX_SEQUENCE_JUMP": "50",
        "SPECDEC_SIDECAR_MAX_SERIES": "300",
        "SPECDEC_SIDECAR_MAX_SERIES_PER_SOURCE": "30",
    }
    c = cfg(**env)
    assert (c.max_sequence_jump, c.max_series, c.max_series_per_source) == (50, 300, 30)
    c = cfg(["--max-sequence-jump", "0", "--max-series", "100", "--max-series-per-source", "100"], **env)
    assert (c.max_sequence_jump, c.max_series, c.max_series_per_source) == (0, 100, 100)
    for argv in (
        ["--max-sequence-jump", "-1"],
        ["--max-series", "0"],
        ["--max-series", "2000"],
        ["--max-series-per-source", "0"],
        ["--max-series", "10", "--max-series-per-source", "11"],
    ):
        with pytest.raises(ConfigError, match=argv[-2]):
            cfg(argv)
