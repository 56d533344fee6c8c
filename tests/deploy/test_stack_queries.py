"""Every PromQL expression of the dashboard and the alert rules, run against a real Prometheus
that scraped a real sidecar fed by a real service run (started the `make run` way, by
scripts/run_stack.sh, with a tiny random model on CPU).

What the data contains: requests with the ngram, none and draft_model drafters in two waves
(so that rates over the window are non-zero), one record that breaks an invariant sent
straight to the sidecar (the rejected-records series), and an OTLP exporter pointed at a
closed local port (the export-failures series), next to the sidecar's own Prometheus
endpoint, which the test Prometheus scrapes every second.

Checks:
- every metric an expression uses is one the sidecar exports (its /metrics), is a counter
  or a histogram (whose names the collector's prometheus exporter translates identically;
  a gauge with unit "1" would get a `_ratio` suffix there and not here), and is documented
  in docs/metrics.md;
- every dashboard target, template variable and recording rule returns data, with at least
  one finite value;
- every alert expression, with its comparisons turned into `bool` ones, returns data (its
  operands exist and their labels match); `absent(x)` alerts: x has data and the alert is
  quiet; the rejected-records and export-failure alerts fire on the real events;
- the images' health probe (deploy/grpc_health_probe.py) reports the real service and sidecar
  SERVING and a closed port as unhealthy.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from testkit.tiny_model import save_tiny_model
from tests.deploy import promql

REPO = Path(__file__).resolve().parents[2]
DOCS_METRICS = REPO / "docs" / "metrics.md"

pytestmark = pytest.mark.timeout(600)

METHODS = {
    "ngram": metrics_pb2.SPECULATION_METHOD_NGRAM,
    "none": metrics_pb2.SPECULATION_METHOD_NONE,
    "draft_model": metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL,
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the",
    "def add(a, b):\n    return a + b\ndef add(a, b):\n    return",
    "Speculative decoding proposes draft tokens and verifies them in one pass. Speculative",
]


def _support():
    # The telemetry engineer's reusable machinery (a real Prometheus, free ports, waits).
    from tests.telemetry import support

    return support


def _wait_serving(address: str, timeout: float, stack: subprocess.Popen, log: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if stack.poll() is not None:
                raise AssertionError(f"run_stack.sh exited {stack.returncode}:\n" + log.read_text()[-4000:])
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise AssertionError(f"{address} not SERVING after {timeout}s:\n" + log.read_text()[-4000:])


class Stack:
    """scripts/run_stack.sh (sidecar, then service) on free loopback ports."""

    def __init__(self, workdir: Path) -> None:
        support = _support()
        self.model_dir = save_tiny_model(workdir / "tiny-model", seed=0, layers=2)
        self.port, self.sidecar_port, self.prom_port, self.dead_port = (support.free_port() for _ in range(4))
        self.address = f"127.0.0.1:{self.port}"
        self.sidecar_address = f"127.0.0.1:{self.sidecar_port}"
        self.metrics_address = f"127.0.0.1:{self.prom_port}"
        env = {
            **os.environ,
            "VENV": str(Path(sys.executable).parent.parent),
            "SPECDEC_LISTEN": self.address,
            "SPECDEC_SIDECAR_LISTEN": self.sidecar_address,
            # run_stack.sh's name for the scrape address, and the sidecar's own flag variable
            "SPECDEC_SIDECAR_PROMETHEUS_ADDRESS": self.metrics_address,
            "SPECDEC_MODEL": str(self.model_dir),
            "SPECDEC_DRAFT_MODEL": str(self.model_dir),
            "SPECDEC_DTYPE": "float32",
            "SPECDEC_DEVICE": "cpu",
            "SPECDEC_MAX_BATCH_SIZE": "4",
            "SPECDEC_NUM_DRAFT_TOKENS": "4",
            # Every per-position and acceptance panel needs drafts; the adaptive policy may
            # rightly choose plain decoding for a tiny model on a busy CPU.
            "SPECDEC_ADAPTIVE_DRAFT_LENGTH": "false",
            # Prometheus endpoint for the test, plus OTLP to a closed port: exports fail and
            # the export-failure series exists. Acknowledge on aggregation, so the failing
            # export does not hold the service's records back.
            "SPECDEC_SIDECAR_EXPORTERS": "otlp,prometheus",
            "SPECDEC_SIDECAR_ACK_MODE": "aggregate",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.dead_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_METRIC_EXPORT_TIMEOUT": "2000",
        }
        for name in ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_METRICS_EXPORTER"):
            env.pop(name, None)
        self.log_path = workdir / "stack.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(REPO / "scripts" / "run_stack.sh")],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_serving(self.address, 240, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def generate(self, method: str, prompt: str, max_tokens: int = 24):
        with grpc.insecure_channel(self.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            responses = list(
                stub.Generate(
                    generation_pb2.GenerateRequest(
                        text=prompt,
                        max_tokens=max_tokens,
                        speculation=generation_pb2.SpeculationParams(method=METHODS[method]),
                    ),
                    timeout=120,
                )
            )
        final = responses[-1]
        assert final.HasField("final"), final
        return final.final

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def _send_invalid_record(sidecar_address: str) -> None:
    """One record that breaks `accepted_drafts <= proposed_drafts`, straight to the ingest."""
    from specdec.v1 import telemetry_pb2, telemetry_pb2_grpc
    from tests.telemetry.support import simulate_metrics

    record = simulate_metrics(
        random.Random(6), ("deploy-test-model", METHODS["ngram"], "", 4), instance_id="deploy-test", passes=6
    )
    record.accepted_drafts = record.proposed_drafts + 1
    request = telemetry_pb2.ReportRequest(
        source_id="deploy-test-invalid", records=[telemetry_pb2.MetricsRecord(sequence=1, metrics=record)]
    )
    with grpc.insecure_channel(sidecar_address) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        responses = stub.Report(iter([request]), timeout=10)
        first = next(responses)
        responses.cancel()
    assert first.rejected == 1, first


def _exported(text: str) -> tuple[set[str], dict[str, str]]:
    """Sample names and the TYPE of each metric family in a Prometheus text exposition."""
    samples, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind.strip()
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return samples, types


def _family(name: str, types: dict[str, str]) -> tuple[str, str | None]:
    for suffix in ("", "_bucket", "_sum", "_count", "_total", "_created"):
        if suffix and not name.endswith(suffix):
            continue
        base = name[: len(name) - len(suffix)] if suffix else name
        for candidate in (base, name):
            if candidate in types:
                return candidate, types[candidate]
    return name, None


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(stack, prometheus, requests sent): the data every test below queries."""
    support = _support()
    binary = support.ensure_prometheus_binary()
    if binary is None:
        pytest.fail(
            "the prometheus binary is missing and could not be installed "
            "(apt-get install -y prometheus; `make test` does it via system-deps)"
        )
    workdir = tmp_path_factory.mktemp("deploy-stack")
    stack = Stack(workdir)
    prometheus = None
    try:
        (workdir / "prometheus").mkdir()
        prometheus = support.PrometheusServer(binary, workdir / "prometheus")
        prometheus.set_targets([stack.metrics_address])
        support.wait_for(lambda: prometheus.query("up == 1"), 30, 0.5, "first scrape")
        sent = 0
        finals = []
        for wave in range(2):  # two waves, scrapes in between: non-zero rates
            for i, method in enumerate(("ngram", "none", "draft_model", "ngram")):
                finals.append(stack.generate(method, PROMPTS[(i + wave) % len(PROMPTS)]))
                sent += 1
            if wave == 0:
                support.wait_for(
                    lambda: (prometheus.scalar("sum(specdec_requests_total)") or 0) >= sent,  # noqa: B023
                    60,
                    0.5,
                    "first wave in Prometheus",
                )
                time.sleep(2.5)
        assert any(f.metrics.proposed_drafts > 0 for f in finals), (
            "no request proposed a draft: the acceptance panels would have nothing to show"
        )
        _send_invalid_record(stack.sidecar_address)
        support.wait_for(
            lambda: (
                (prometheus.scalar("sum(specdec_requests_total)") or 0) >= sent
                and prometheus.query("specdec_sidecar_records_rejected_total")
                and prometheus.query("specdec_sidecar_export_failures_total")
            ),
            60,
            0.5,
            "all requests, a rejected record and an export failure in Prometheus",
        )
        time.sleep(3)  # a few more scrapes after the last change
        yield stack, prometheus, sent
    finally:
        if prometheus is not None:
            prometheus.close()
        stack.stop()


def _values(result: list[dict]) -> list[float]:
    out = []
    for series in result:
        if "value" in series:
            out.append(float(series["value"][1]))
        for _, v in series.get("values", []):
            out.append(float(v))
    return out


def _all_expressions() -> list[promql.Expression]:
    return promql.dashboard_expressions() + promql.dashboard_variable_queries() + promql.rule_expressions()


def test_every_metric_used_is_exported_by_the_sidecar(scraped) -> None:
    stack, _, _ = scraped
    samples, types = _exported(stack.metrics_text())
    records = promql.recording_rules()
    used: dict[str, list[str]] = {}
    for e in _all_expressions():
        expr = promql.expand_recording_rules(e.expr, records)
        for name in promql.metric_names(expr):
            used.setdefault(name, []).append(e.where)
    assert used, "no metric names found in the dashboard and rules"
    missing = {n: w for n, w in used.items() if n not in samples}
    assert not missing, (
        f"expressions use metrics the sidecar does not export: {missing}\n"
        f"exported: {sorted(s for s in samples if s.startswith(('specdec', 'gen_ai')))}"
    )
    foreign = {n: w for n, w in used.items() if not n.startswith(("specdec_", "gen_ai_"))}
    assert not foreign, f"only the sidecar's own series reach the compose Prometheus: {foreign}"
    for name, where in used.items():
        family, kind = _family(name, types)
        assert kind in ("counter", "histogram"), (
            f"{name} ({where}) is a {kind}: only counters and histograms have the same name "
            "on the sidecar's endpoint and behind the collector (a gauge with unit 1 gets "
            "a _ratio suffix there)"
        )


def test_every_metric_used_is_documented(scraped) -> None:
    """docs/metrics.md (the sidecar's documented interface) names each series the dashboard
    and the rules use, by its Prometheus name (histograms by their base name)."""
    if not DOCS_METRICS.exists():
        pytest.fail("docs/metrics.md (the sidecar's documented metric names) is missing")
    docs = DOCS_METRICS.read_text()
    records = promql.recording_rules()
    undocumented = set()
    for e in _all_expressions():
        for name in promql.metric_names(promql.expand_recording_rules(e.expr, records)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            # exact name, or a histogram's base written as `base_*` / `base_{bucket,...}`
            if not re.search(rf"(?<![a-zA-Z0-9_]){re.escape(base)}(?![a-zA-Z0-9]|_[a-zA-Z0-9])", docs):
                undocumented.add(name)
    assert not undocumented, f"not in docs/metrics.md: {sorted(undocumented)}"


@pytest.mark.parametrize("kind", ["panel", "variable", "record"])
def test_dashboard_and_recording_rule_expressions_return_data(scraped, kind) -> None:
    _, prometheus, _ = scraped
    records = promql.recording_rules()
    failures = []
    for e in [e for e in _all_expressions() if e.kind == kind]:
        if e.kind == "variable":
            names = promql.metric_names(e.expr)
            label = re.search(r",\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)", e.expr).group(1)
            values = {s["metric"].get(label) for n in names for s in prometheus.query(n)}
            if not values - {None, ""}:
                failures.append(f"{e.where}: no values for {label} in {names}")
            continue
        expr = promql.grafana_substitute(promql.expand_recording_rules(e.expr, records))
        try:
            result = prometheus.query(expr)
        except Exception as exc:  # a syntax error comes back as HTTP 400
            failures.append(f"{e.where}: query failed: {exc}\n{expr}")
            continue
        finite = [v for v in _values(result) if math.isfinite(v)]
        if not result or not finite:
            failures.append(f"{e.where}: {'no data' if not result else 'no finite value'} ({result})\n{expr}")
    assert not failures, "\n\n".join(failures)


def test_alert_expressions_have_data_and_matching_labels(scraped) -> None:
    _, prometheus, _ = scraped
    records = promql.recording_rules()
    failures = []
    for e in [e for e in _all_expressions() if e.kind == "alert"]:
        expr = promql.expand_recording_rules(e.expr, records)
        absent = re.fullmatch(r"\s*absent\((.*)\)\s*", expr, re.S)
        if absent:
            if not prometheus.query(absent.group(1)):
                failures.append(f"{e.where}: {absent.group(1)} has no data")
            if prometheus.query(expr):
                failures.append(f"{e.where}: fires although the telemetry is there")
            continue
        as_bool = promql.comparisons_to_bool(expr)
        if not prometheus.query(as_bool):
            failures.append(f"{e.where}: no data\n{as_bool}")
    assert not failures, "\n\n".join(failures)


def test_pipeline_alerts_fire_on_real_rejects_and_export_failures(scraped) -> None:
    _, prometheus, _ = scraped
    alerts = {e.where.split(":", 1)[1]: e.expr for e in promql.rule_expressions() if e.kind == "alert"}
    rejected = prometheus.query(alerts["SpecDecSidecarRejectingRecords"])
    assert rejected and all(s["metric"].get("reason") for s in rejected), rejected
    failing = prometheus.query(alerts["SpecDecSidecarExportFailing"])
    assert [s["metric"].get("exporter") for s in failing] == ["otlp"], failing
    # Nothing was dropped, and acceptance did not collapse relative to itself.
    assert prometheus.query(alerts["SpecDecMetricsDropped"]) == []


def test_fleet_acceptance_rate_is_the_ratio_of_summed_counters(scraped) -> None:
    """The dashboard's fleet line equals accepted/proposed summed over the run's requests
    (both waves are in the rate window only partly, so compare the counters themselves)."""
    _, prometheus, sent = scraped
    accepted = prometheus.scalar(
        'sum(specdec_accepted_drafts_total{gen_ai_request_model!="deploy-test-model"})'
    )
    proposed = prometheus.scalar(
        'sum(specdec_proposed_drafts_total{gen_ai_request_model!="deploy-test-model"})'
    )
    assert prometheus.scalar("sum(specdec_requests_total)") == sent
    assert proposed and proposed > 0 and 0 <= accepted <= proposed


def test_health_probe_shipped_in_the_images(scraped) -> None:
    stack, _, _ = scraped
    probe = [sys.executable, str(REPO / "deploy" / "grpc_health_probe.py")]
    for address in (stack.address, stack.sidecar_address):
        done = subprocess.run([*probe, "--addr", address], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "SERVING" in done.stdout, done
    # --addr-env with a wildcard listen address, as in the images
    env = {**os.environ, "SPECDEC_LISTEN": f"0.0.0.0:{stack.port}"}
    done = subprocess.run(
        [*probe, "--addr-env", "SPECDEC_LISTEN"], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done
    done = subprocess.run(
        [*probe, "--addr", f"127.0.0.1:{stack.dead_port}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done
