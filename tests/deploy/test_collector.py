"""deploy/otel-collector.yaml, checked structurally (no collector binary here): every
component a pipeline names is defined, every defined component is used, the OTLP receiver
listens on all interfaces, and the prometheus exporter's port is the one Prometheus scrapes."""

from __future__ import annotations

import yaml

from tests.deploy.conftest import REPO

CONFIG = REPO / "deploy" / "otel-collector.yaml"
SECTIONS = ("receivers", "processors", "exporters", "connectors")


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_pipelines_reference_defined_components_and_every_component_is_used() -> None:
    config = load()
    pipelines = config["service"]["pipelines"]
    assert pipelines, "no pipelines"
    used = {s: set() for s in SECTIONS}
    connectors = set(config.get("connectors") or {})
    for name, pipeline in pipelines.items():
        assert name.split("/")[0] in ("metrics", "traces", "logs"), name
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{name} is incomplete"
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                defined = set(config.get(section) or {})
                if section != "processors":
                    defined |= connectors  # a connector is an exporter and a receiver
                assert component in defined, f"pipeline {name}: {section} {component} undefined"
                used["connectors" if component in connectors else section].add(component)
    for section in SECTIONS:
        unused = set(config.get(section) or {}) - used[section]
        assert not unused, f"{section} defined but in no pipeline: {unused}"
    for ext in config["service"].get("extensions", []):
        assert ext in (config.get("extensions") or {}), f"extension {ext} undefined"
    assert set(config.get("extensions") or {}) <= set(config["service"].get("extensions", []))


def test_metrics_pipeline_is_otlp_to_prometheus() -> None:
    config = load()
    metrics = config["service"]["pipelines"]["metrics"]
    assert "otlp" in metrics["receivers"]
    assert any(e.split("/")[0] == "prometheus" for e in metrics["exporters"])
    processors = metrics.get("processors", [])
    assert "batch" in processors
    if "memory_limiter" in processors:  # must come first to protect the rest
        assert processors[0] == "memory_limiter"


def test_otlp_receiver_binds_all_interfaces_on_the_standard_ports() -> None:
    protocols = load()["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


def test_prometheus_exporter_port_is_the_scraped_one() -> None:
    exporter = load()["exporters"]["prometheus"]
    host, port = exporter["endpoint"].rsplit(":", 1)
    assert host == "0.0.0.0"
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    assert f"otel-collector:{port}" in targets
    # Names must match the sidecar's own endpoint: suffixes on, resource attributes not
    # copied onto every series (they are target_info / job / instance).
    assert exporter.get("add_metric_suffixes", True) is True
    assert not exporter.get("resource_to_telemetry_conversion", {}).get("enabled", False)
