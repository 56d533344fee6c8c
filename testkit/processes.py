"""The sidecar (`python -m telemetry`) as a child process on free loopback ports, and the
waiting around it: a free port, a condition polled until true, gRPC health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def env_with_this_checkout(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, so a child `python -m service`
    or `-m telemetry` runs this checkout's code, whatever an editable install of another
    checkout in the environment points at."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def health_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass
class SidecarProcess:
    """`python -m telemetry` as a subprocess on fixed free ports (so a restart comes back at
    the same address). `extra_args`/`env` add flags and variables."""

    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    prometheus_port: int | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    incarnation: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def prometheus_address(self) -> str | None:
        return f"127.0.0.1:{self.prometheus_port}" if self.prometheus_port else None

    def start(self, wait: bool = True, timeout_s: float = 30.0) -> SidecarProcess:
        self.incarnation += 1
        args = [
            sys.executable,
            "-m",
            "telemetry",
            "--listen",
            self.address,
            "--instance-id",
            f"sidecar-test-{self.port}-{self.incarnation}",
            *self.extra_args,
        ]
        if self.prometheus_port:
            args += ["--prometheus-address", self.prometheus_address]
        env = env_with_this_checkout(self.env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out)
        if wait:
            wait_for(
                lambda: self.proc.poll() is not None or health_serving(self.address),
                timeout_s,
                0.1,
                "sidecar health SERVING",
            )
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}; log: {self.log_tail()}")
        return self

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def kill(self) -> None:
        """SIGKILL: no final export, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout_s)
        return self.proc.returncode if self.proc else 0

    def restart(self) -> SidecarProcess:
        self.kill()
        return self.start()
