"""Driving the compose stack on a real Docker engine: compose and docker commands, published
ports, the client, and Prometheus' HTTP API.

The engine and the tools come from scripts/test_deploy.sh through the environment:
DOCKER_HOST (its private daemon), DOCKER_CONFIG (holding the Compose v2 plugin), and
SPECDEC_DEPLOY_* for the base images and the CA bundle pip needs here.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
OVERRIDE = Path(__file__).with_name("compose.test.yml")
PIP_CA = REPO / "deploy" / "compose.pip-ca.yml"
SECURE = REPO / "deploy" / "compose.secure.yml"
CLIENT = Path(sys.executable).with_name("specdec-client")
# SPECDEC_GRACE_PERIOD_S of the test stack (the shipped default is 30 s).
DRAIN_GRACE_S = 90

# What a request's final metrics add to, and the sidecar counter that must equal the sum.
COUNTERS = {
    "requests": "specdec_requests_total",
    "prompt_tokens": "specdec_prompt_tokens_total",
    "completion_tokens": "specdec_completion_tokens_total",
    "verify_passes": "specdec_verify_passes_total",
    "proposed_drafts": "specdec_proposed_drafts_total",
    "accepted_drafts": "specdec_accepted_drafts_total",
}


class CommandFailed(AssertionError):
    pass


def run(
    cmd: list[str], env: dict[str, str], timeout: float, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def _ephemeral_range() -> range:
    """The kernel's ephemeral port range: a port in it that a stopped container released can
    be taken by any process's next connection before the container starts again."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p with p and p+1 both free on 127.0.0.1 (the service's range for two replicas),
    outside the ephemeral range: the stack's ports are released and bound again when a
    container restarts."""
    return _free_ports(2)


def free_port() -> int:
    return _free_ports(1)


def _free_ports(count: int) -> int:
    ephemeral = _ephemeral_range()
    candidates = [p for p in range(20000, 32000) if p not in ephemeral and p + count - 1 not in ephemeral]
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:500]:
        if all(_bindable(port + i) for i in range(count)):
            return port
    raise RuntimeError(f"no {count} consecutive free ports outside the ephemeral range")


@dataclass
class Totals:
    """Sums of the final messages' metrics over every request the stack answered."""

    values: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COUNTERS})

    def add(self, results: list[dict]) -> None:
        for r in results:
            self.values["requests"] += 1
            self.values["prompt_tokens"] += r["prompt_tokens"]
            self.values["completion_tokens"] += r["completion_tokens"]
            for key in ("verify_passes", "proposed_drafts", "accepted_drafts"):
                self.values[key] += int(r["metrics"].get(key, 0))


class Stack:
    """One compose project of docker-compose.yml (CPU profile) plus the test override."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.service_port = free_port_pair()
        self.prometheus_port = free_port()
        self.sidecar_port = free_port()
        self.ca_bundle = os.environ.get("SPECDEC_DEPLOY_CA_BUNDLE", "")
        self.files = [REPO / "docker-compose.yml", OVERRIDE] + ([PIP_CA] if self.ca_bundle else [])
        self.env = dict(os.environ)
        self.env.update(
            {
                "COMPOSE_PROJECT_NAME": project,
                # Both replicas of a scaled service publish on the host: one port of the range each.
                "SPECDEC_PORT": f"{self.service_port}-{self.service_port + 1}",
                "SPECDEC_SIDECAR_PORT": str(self.sidecar_port),
                "PROMETHEUS_PORT": str(self.prometheus_port),
                "OTEL_COLLECTOR_OTLP_GRPC_PORT": str(free_port()),
                "OTEL_COLLECTOR_OTLP_HTTP_PORT": str(free_port()),
                "OTEL_COLLECTOR_PROMETHEUS_PORT": str(free_port()),
                "SPECDEC_SERVICE_BASE_IMAGE": os.environ["SPECDEC_DEPLOY_PYTHON_BASE"],
                "SPECDEC_SIDECAR_BASE_IMAGE": os.environ["SPECDEC_DEPLOY_PYTHON_BASE"],
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "SPECDEC_PIP_CA_BUNDLE": self.ca_bundle,
                # A busy 2-core machine decodes several times slower than the speed measured a
                # few minutes earlier: the drain test's requests must still end within the grace
                # (the shipped 30 s against 45 s is checked by tests/deploy/test_compose.py).
                "SPECDEC_GRACE_PERIOD_S": str(DRAIN_GRACE_S),
            }
        )

    # ---- commands ----------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        cmd = ["docker", "compose", *files, "--profile", "cpu", *args]
        return run(cmd, self.env, timeout, check)

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", *args], self.env, timeout, check)

    def containers(self, service: str | None = None, all_states: bool = True) -> list[str]:
        args = ["ps", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.project}"]
        if all_states:
            args.insert(1, "-a")
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        return self.docker(*args).stdout.split()

    def container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"{service}: expected one container, found {ids}"
        return ids[0]

    def inspect(self, container: str) -> dict:
        return json.loads(self.docker("inspect", container).stdout)[0]

    def logs(self, container: str) -> str:
        proc = self.docker("logs", container)
        return proc.stdout + proc.stderr

    def health(self, container: str) -> str:
        return self.inspect(container)["State"].get("Health", {}).get("Status", "none")

    def wait_healthy(self, container: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect(container)["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic()
            assert state["Status"] in ("created", "running", "restarting"), (
                f"{container[:12]} is {state['Status']}:\n{self.logs(container)[-3000:]}"
            )
            time.sleep(1)
        raise AssertionError(
            f"{container[:12]} not healthy after {timeout} s:\n{self.logs(container)[-3000:]}"
        )

    def published(self, container: str, port: int) -> str:
        """HOST:PORT where a container publishes `port` (by container: after a scale-down,
        which replica number survived is Compose's choice)."""
        out = self.docker("port", container, str(port)).stdout.split()
        assert out, f"{container[:12]} publishes no port {port}"
        return out[0]

    def service_address(self, service: str, port: int) -> str:
        return self.published(self.container_running(service), port)

    def container_running(self, service: str) -> str:
        ids = self.containers(service, all_states=False)
        assert len(ids) == 1, f"{service}: expected one running container, found {ids}"
        return ids[0]

    # ---- requests ------------------------------------------------------------------------
    def client(
        self,
        target: str,
        requests: int,
        concurrency: int,
        max_tokens: int,
        prompt: str = "List the first twenty prime numbers, then explain how you found them.",
        timeout: float = 300,
    ) -> list[dict]:
        """specdec-client --json against a published port; every request must succeed."""
        proc = run(
            [
                str(CLIENT),
                "--target",
                target,
                "--json",
                "--chat",
                "--requests",
                str(requests),
                "--concurrency",
                str(concurrency),
                "--max-tokens",
                str(max_tokens),
                prompt,
            ],
            self.env,
            timeout,
        )
        results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if requests == 1:
            assert len(results) == 1, proc.stdout
        else:
            summary = json.loads(proc.stderr.strip().splitlines()[-1])
            assert summary["failed"] == 0 and summary["succeeded"] == requests, proc.stderr
        assert len(results) == requests
        return results

    def client_process(
        self, target: str, requests: int, concurrency: int, max_tokens: int
    ) -> subprocess.Popen:
        """specdec-client in the background; its first stderr line (--info: GetServerInfo)
        says it is connected and about to send."""
        return subprocess.Popen(
            [
                str(CLIENT),
                "--target",
                target,
                "--json",
                "--chat",
                "--info",
                "--requests",
                str(requests),
                "--concurrency",
                str(concurrency),
                "--max-tokens",
                str(max_tokens),
                "List the first twenty prime numbers, then explain how you found them.",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # ---- Prometheus ------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def counter_sum(self, metric: str) -> int:
        """Sum over every series (each sidecar process is its own `instance`) of the series'
        latest value: a killed sidecar's series keeps the count it had exported."""
        result = self.query(f"sum(last_over_time({metric}[1h]))")
        return int(float(result[0]["value"][1])) if result else 0

    def counters(self) -> dict[str, int]:
        return {key: self.counter_sum(metric) for key, metric in COUNTERS.items()}

    def wait_counters(self, expected: dict[str, int], timeout: float = 90) -> dict[str, int]:
        """Until Prometheus shows exactly `expected`; then still so one scrape interval
        (15 s) later: a late resend counted twice would show up there."""
        deadline = time.monotonic() + timeout
        seen: dict[str, int] = {}
        while time.monotonic() < deadline:
            seen = self.counters()
            if seen == expected:
                time.sleep(16)
                seen = self.counters()
                assert seen == expected, f"counters moved past the sums: {seen} != {expected}"
                return seen
            assert all(seen[k] <= expected[k] for k in expected), (
                f"counted more than the requests reported: {seen} > {expected}"
            )
            time.sleep(1)
        raise AssertionError(f"Prometheus counters {seen} != sums of final metrics {expected}")
