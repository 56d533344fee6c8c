"""`specdec-server` as a child process for a benchmark: started on a free loopback port, ready
when GetServerInfo answers (it refuses with UNAVAILABLE while the models load), stopped with
SIGTERM (the service drains and exits 0). Its output goes to a log file.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from service.client.loadgen.requests import server_info
from specdec.v1 import generation_pb2, generation_pb2_grpc
from testkit.processes import REPO, env_with_this_checkout, free_port


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message holds its log's tail."""


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class ServerProcess:
    """`python -m service ARGS --listen 127.0.0.1:PORT` (the same code as `specdec-server`)."""

    def __init__(self, server_args: Sequence[str], log_path: Path) -> None:
        self.server_args = list(server_args)
        self.log_path = log_path
        self.address = f"127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None
        self.info: generation_pb2.GetServerInfoResponse | None = None
        self.ready_seconds: float | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "service", *self.server_args, "--listen", self.address]

    def start(self, timeout_s: float) -> ServerProcess:
        """Starts the server and waits until it serves (at most `timeout_s`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env_with_this_checkout(),
            )
        try:
            self.info = asyncio.run(self._wait_ready(timeout_s))
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    async def _wait_ready(self, timeout_s: float) -> generation_pb2.GetServerInfoResponse:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"the server exited with status {self.process.returncode} before "
                        f"serving; its log ({self.log_path}) ends:\n{_tail(self.log_path)}"
                    )
                try:
                    return await server_info(stub, min(5.0, max(0.1, deadline - time.monotonic())))
                except grpc.aio.AioRpcError as exc:
                    if time.monotonic() >= deadline:
                        raise ServerStartError(
                            f"the server did not serve within {timeout_s:.0f} s "
                            f"({exc.code().name}); its log ({self.log_path}) ends:\n"
                            f"{_tail(self.log_path)}"
                        ) from None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
