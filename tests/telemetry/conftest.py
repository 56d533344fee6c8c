"""Fixtures for the telemetry tests (the machinery itself is in tests/telemetry/support.py,
importable by other test packages)."""

from __future__ import annotations

import pytest

from tests.telemetry.support import (
    OtlpGrpcReceiver,
    OtlpHttpReceiver,
    PrometheusServer,
    SidecarProcess,
    SidecarThread,
    ensure_prometheus_binary,
)


@pytest.fixture
def otlp_grpc_receiver():
    r = OtlpGrpcReceiver()
    yield r
    r.close()


@pytest.fixture
def otlp_http_receiver():
    r = OtlpHttpReceiver()
    yield r
    r.close()


@pytest.fixture(params=["grpc", "http/protobuf"])
def otlp_receiver(request):
    r = OtlpGrpcReceiver() if request.param == "grpc" else OtlpHttpReceiver()
    yield r
    r.close()


@pytest.fixture
def sidecar_thread_factory(monkeypatch):
    """Start in-process sidecars: factory(argv, env) -> SidecarThread; stopped afterwards."""
    started: list[SidecarThread] = []

    def factory(argv: list[str], env: dict[str, str] | None = None) -> SidecarThread:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        s = SidecarThread(["--listen", "127.0.0.1:0", *argv])
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def sidecar_process_factory(tmp_path):
    """Start `python -m telemetry` subprocesses on free ports:
    factory(extra_args, env, prometheus_port=None, start=True) -> SidecarProcess.
    Logs go to tmp_path/sidecar-N.log; every process is killed afterwards."""
    procs: list[SidecarProcess] = []

    def factory(extra_args=(), env=None, prometheus_port=None, start=True) -> SidecarProcess:
        p = SidecarProcess(
            extra_args=list(extra_args),
            env=dict(env or {}),
            prometheus_port=prometheus_port,
            log_path=tmp_path / f"sidecar-{len(procs)}.log",
        )
        procs.append(p)
        return p.start() if start else p

    yield factory
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory):
    """A real Prometheus server (installed from the Debian package if missing)."""
    binary = ensure_prometheus_binary()
    if binary is None:
        pytest.skip(
            "PROMETHEUS NOT AVAILABLE: the `prometheus` binary is missing and "
            "`apt-get install -y prometheus` failed (needs root and a package mirror); "
            "the real-Prometheus scrape test cannot run"
        )
    server = PrometheusServer(binary, tmp_path_factory.mktemp("prometheus"))
    yield server
    server.close()
