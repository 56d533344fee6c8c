"""deploy/prometheus: promtool accepts the config and the rules, and the alert rules behave
as intended on synthetic series (promtool test rules, tests/deploy/rules_test.yml)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        from tests.telemetry.support import ensure_prometheus_binary  # installs the Debian package

        ensure_prometheus_binary()
        path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing and `apt-get install -y prometheus` failed "
            "(`make test` installs it via the system-deps target)"
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_promtool_check_config(promtool) -> None:
    done = _run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_check_rules(promtool) -> None:
    done = _run(promtool, "check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests(promtool) -> None:
    done = _run(promtool, "test", "rules", str(REPO / "tests" / "deploy" / "rules_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_cover_the_issue(promtool) -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    collapse = alerts["SpecDecAcceptanceRateCollapsed"]["expr"]
    # absolute threshold AND relative to the 6 h rate AND enough traffic
    assert len(re.findall(r"\band\b", collapse)) == 2 and "6h" in collapse
    assert "specdec_sidecar_service_dropped_records_total" in alerts["SpecDecMetricsDropped"]["expr"]
    assert "records_rejected" in alerts["SpecDecSidecarRejectingRecords"]["expr"]
    assert "export_failures" in alerts["SpecDecSidecarExportFailing"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_collector_job_keeps_the_sidecars_labels() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "otel-collector")
    assert job.get("honor_labels") is True
