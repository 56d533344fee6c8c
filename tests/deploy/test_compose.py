"""docker-compose.yml: valid against the Compose specification's JSON schema (kept in
deploy/schema/), and consistent with itself and with the configs it mounts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema  # dev extra
import pytest
import yaml

from tests.deploy.conftest import COMPOSE_FILE, REPO, interpolate_tree

SCHEMA = REPO / "deploy" / "schema" / "compose-spec.json"
COLLECTOR = REPO / "deploy" / "otel-collector.yaml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _host_port(address: str) -> tuple[str, int]:
    if "://" in address:
        u = urlparse(address)
        return u.hostname, u.port
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, is_bind) of each short-syntax volume."""
    out = []
    for v in service.get("volumes", []):
        parts = v.split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, source.startswith((".", "/"))))
    return out


def _host_path(compose: dict, service: str, container_path: str) -> Path | None:
    """The repository file a container path comes from, through the service's bind mounts."""
    for source, target, bind in _mounts(compose["services"][service]):
        if not bind:
            continue
        if container_path == target:
            return (REPO / source).resolve()
        if container_path.startswith(target.rstrip("/") + "/"):
            return (REPO / source / container_path[len(target.rstrip("/")) + 1 :]).resolve()
    return None


def _flags(command: list[str]) -> dict[str, str]:
    return dict(a.lstrip("-").split("=", 1) for a in command if a.startswith("--") and "=" in a)


def _published(service: dict) -> dict[int, str]:
    """container port -> host port spec, from short-syntax ports."""
    out = {}
    for p in service.get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1].split("/")[0])] = ":".join(parts[:-1])
    return out


# ---- the schema --------------------------------------------------------------------------


def test_schema_is_the_registry_copy() -> None:
    readme = (SCHEMA.parent / "README.md").read_text()
    import hashlib

    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in readme, "deploy/schema/README.md must record the schema's sha256"
    assert "docker-compose" in readme and "1.29.2" in readme


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "defaults"])
def test_compose_file_validates_against_the_compose_spec(compose_raw, interpolated) -> None:
    schema = json.loads(SCHEMA.read_text())
    document = interpolate_tree(compose_raw) if interpolated else compose_raw
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_validation_catches_mistakes(compose_raw) -> None:
    """The validator is not vacuous: a misspelt key and a bad depends_on condition fail."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    broken = json.loads(json.dumps(compose_raw))
    broken["services"]["sidecar"]["healthcheck"]["intervall"] = "5s"
    assert list(validator.iter_errors(broken))
    broken = json.loads(json.dumps(compose_raw))
    broken["services"]["grafana"]["depends_on"]["prometheus"]["condition"] = "healthy"
    assert list(validator.iter_errors(broken))


# ---- variables -----------------------------------------------------------------------------


def test_every_variable_has_a_default() -> None:
    text = "\n".join(
        line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    refs = re.findall(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", text)
    assert refs, "configuration is by environment variables"
    bare = [r for r in refs if not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-[^}]*\}", r)]
    assert not bare, f"variables without a ${{VAR:-default}}: {bare}"


def test_service_variables_are_the_services_own(compose) -> None:
    from service.config import OPTIONS

    known = {o.env for o in OPTIONS}
    for name in ("service", "service-cpu"):
        env = compose["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("SPECDEC_")} - known
        assert not unknown, f"{name}: not service settings (service/config.py): {unknown}"


def test_sidecar_variables_are_the_sidecars_own(compose) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "telemetry", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stdout
    known = set(re.findall(r"SPECDEC_SIDECAR_[A-Z0-9_]+", help_text))
    assert known, "python -m telemetry --help lists no SPECDEC_SIDECAR_* variables"
    env = compose["services"]["sidecar"]["environment"]
    unknown = {k for k in env if k.startswith("SPECDEC_SIDECAR_")} - known
    assert not unknown, f"sidecar: not sidecar settings (python -m telemetry --help): {unknown}"


# ---- services, dependencies, health --------------------------------------------------------


def test_expected_services_and_profiles(compose) -> None:
    services = compose["services"]
    assert {"service", "service-cpu", "sidecar", "otel-collector", "prometheus", "grafana"} <= services.keys()
    gpu = services["service"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert "profiles" not in gpu, "the GPU service is the default"
    cpu = services["service-cpu"]
    assert cpu.get("profiles") == ["cpu"]
    assert "deploy" not in cpu, "the cpu profile must not reserve a GPU"
    assert cpu["environment"]["SPECDEC_DEVICE"] == "cpu"
    assert cpu["image"] == gpu["image"], "one image for both"
    assert "contrib" in services["otel-collector"]["image"]


def test_depends_on_targets_exist_and_healthy_ones_have_healthchecks(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert not services[target].get("profiles") or service.get("profiles"), (
                f"{name} (always on) depends on {target}, which only runs in a profile"
            )
            if spec["condition"] == "service_healthy":
                check = services[target].get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
    # The startup order the issue asks for.
    assert services["service"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["service-cpu"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_healthchecks_probe_the_ports_the_processes_listen_on(compose) -> None:
    services = compose["services"]
    for name, listen_var in (
        ("service", "SPECDEC_LISTEN"),
        ("service-cpu", "SPECDEC_LISTEN"),
        ("sidecar", "SPECDEC_SIDECAR_LISTEN"),
    ):
        service = services[name]
        listen = service["environment"][listen_var]
        assert listen.startswith("0.0.0.0:"), f"{name} must listen on all interfaces"
        test = service["healthcheck"]["test"]
        assert "grpc-health-probe" in test, f"{name}: health check must use the gRPC health service"
        addr = test[test.index("--addr") + 1]
        assert _port(addr) == _port(listen), (name, addr, listen)
        assert _port(listen) in _published(service), f"{name} publishes its port"
    prom_port = int(
        _flags(services["prometheus"]["command"]).get("web.listen-address", ":9090").rsplit(":", 1)[1]
    )
    assert f"127.0.0.1:{prom_port}/" in " ".join(services["prometheus"]["healthcheck"]["test"])
    assert "127.0.0.1:3000/api/health" in " ".join(services["grafana"]["healthcheck"]["test"])


# ---- addresses between services ------------------------------------------------------------


def test_service_reports_to_the_sidecar(compose) -> None:
    services = compose["services"]
    sidecar_port = _port(services["sidecar"]["environment"]["SPECDEC_SIDECAR_LISTEN"])
    for name in ("service", "service-cpu"):
        host, port = _host_port(services[name]["environment"]["SPECDEC_TELEMETRY_TARGET"])
        assert (host, port) == ("sidecar", sidecar_port)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_stop_waits_longer_than_the_drain_grace_period(compose) -> None:
    """`docker compose stop` kills a container after stop_grace_period; the service must get
    its whole drain (SPECDEC_GRACE_PERIOD_S) and the metrics flush after it first."""
    for name in ("service", "service-cpu"):
        service = compose["services"][name]
        grace = float(service["environment"]["SPECDEC_GRACE_PERIOD_S"])
        assert _seconds(service["stop_grace_period"]) >= grace + 10, (name, grace)


def test_sidecar_exports_to_the_collectors_otlp_receiver(compose) -> None:
    env = compose["services"]["sidecar"]["environment"]
    collector = yaml.safe_load(COLLECTOR.read_text())
    protocols = collector["receivers"]["otlp"]["protocols"]
    host, port = _host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host in compose["services"], host
    protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    receiver = protocols["grpc" if protocol == "grpc" else "http"]["endpoint"]
    assert port == _port(receiver), (env["OTEL_EXPORTER_OTLP_ENDPOINT"], receiver)
    assert "otlp" in env["SPECDEC_SIDECAR_EXPORTERS"].split(",")
    published = _published(compose["services"][host])
    assert {_port(p["endpoint"]) for p in protocols.values()} <= published.keys()


def test_prometheus_scrapes_the_collectors_exporter(compose) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    collector = yaml.safe_load(COLLECTOR.read_text())
    exporter_ports = {
        _port(e["endpoint"]) for n, e in collector["exporters"].items() if n.split("/")[0] == "prometheus"
    }
    targets = [
        t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    ]
    for target in targets:
        host, port = _host_port(target)
        if host == "localhost":
            assert port == 9090
            continue
        assert host in compose["services"], f"scrape target {target}: no such service"
        if host == "otel-collector":
            assert port in exporter_ports, (target, exporter_ports)
    assert any(_host_port(t)[0] == "otel-collector" for t in targets)


def test_grafana_datasource_points_at_the_prometheus_service(compose) -> None:
    sources = [ds for f in DATASOURCES.glob("*.yml") for ds in yaml.safe_load(f.read_text())["datasources"]]
    assert len(sources) == 1
    ds = sources[0]
    host, port = _host_port(ds["url"])
    assert host == "prometheus" and host in compose["services"]
    assert port in _published(compose["services"]["prometheus"])
    assert ds["uid"] == "specdec-prometheus" and ds["type"] == "prometheus"


# ---- volumes and mounted files -------------------------------------------------------------


def test_volumes_are_declared_and_mounted_files_exist(compose) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for source, _target, bind in _mounts(service):
            if bind:
                path = (REPO / source).resolve()
                assert path.exists(), f"{name}: mounted {source} does not exist"
                assert REPO in path.parents, f"{name}: {source} is outside the repository"
            else:
                used.add(source)
                assert source in declared, f"{name}: volume {source} is not declared"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    assert "/models" in [t for _, t, _ in _mounts(compose["services"]["service"])]


def test_mounted_configs_are_where_the_processes_read_them(compose) -> None:
    services = compose["services"]
    # collector: --config is a mounted file
    flags = _flags(services["otel-collector"]["command"])
    assert _host_path(compose, "otel-collector", flags["config"]) == COLLECTOR.resolve()
    # prometheus: --config.file, and its relative rule_files next to it
    flags = _flags(services["prometheus"]["command"])
    config_path = flags["config.file"]
    assert _host_path(compose, "prometheus", config_path) == PROMETHEUS.resolve()
    for rule_file in yaml.safe_load(PROMETHEUS.read_text())["rule_files"]:
        in_container = rule_file if rule_file.startswith("/") else str(Path(config_path).parent / rule_file)
        host = _host_path(compose, "prometheus", in_container)
        assert host and host.exists(), f"rule file {in_container} is not mounted"
    # grafana: provisioning dir, the dashboards path of the provider, the home dashboard
    assert (
        _host_path(compose, "grafana", "/etc/grafana/provisioning")
        == (REPO / "deploy" / "grafana" / "provisioning").resolve()
    )
    for f in DASHBOARD_PROVIDERS.glob("*.yml"):
        for provider in yaml.safe_load(f.read_text())["providers"]:
            host = _host_path(compose, "grafana", provider["options"]["path"])
            assert host and list(host.glob("*.json")), provider
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host = _host_path(compose, "grafana", home)
    assert host and host.exists(), home


def test_images_are_pinned_and_builds_exist(compose) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), (
            f"{name}: image {image} is not pinned to a version"
        )
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).exists()
            import tomllib

            version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
            assert tag == version, f"{name}: built image tag {tag} != project version {version}"
            base = (build.get("args") or {}).get("BASE_IMAGE")
            if base:
                assert re.search(r":\d", base), base
