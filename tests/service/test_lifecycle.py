"""Health transitions, reflection, and SIGTERM drain of a subprocess started the README way."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_goes_not_serving_then_serving_then_not_serving_while_draining(run_service) -> None:
    from service import server

    release = threading.Event()

    def slow_build(config):
        assert release.wait(60)
        return server.build_engine(config)

    service = run_service(build_engine=slow_build, wait_ready=False)
    try:
        channel = grpc.insecure_channel(service.address)
        health = health_pb2_grpc.HealthStub(channel)
        seen: list[int] = []
        watch = health.Watch(health_pb2.HealthCheckRequest(service="specdec.v1.GenerationService"))

        def record() -> None:
            try:
                for response in watch:
                    seen.append(response.status)
            except grpc.RpcError as exc:  # watch.cancel() at the end
                assert exc.code() == grpc.StatusCode.CANCELLED

        watcher = threading.Thread(target=record, daemon=True)
        watcher.start()
        # Loading: NOT_SERVING, and Generate is refused with UNAVAILABLE.
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(
                generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    generation_pb2.GenerateRequest(text="hi"), timeout=5
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Server info is not known before the models are (it would read max_context_tokens 0).
        with pytest.raises(grpc.RpcError) as info:
            generation_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(
                generation_pb2.GetServerInfoRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        release.set()
        service.wait_ready()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        service.request_stop()
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] != NOT_SERVING or SERVING not in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen[0] == NOT_SERVING and SERVING in seen and seen[-1] == NOT_SERVING, seen
        assert seen.index(SERVING) < len(seen) - 1
        watch.cancel()
        watcher.join(5)
        channel.close()
    finally:
        release.set()


def test_reflection_lists_the_services(run_service) -> None:
    service = run_service()
    with grpc.insecure_channel(service.address) as channel:
        names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"specdec.v1.GenerationService", "grpc.health.v1.Health"} <= names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(address: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{address} did not become SERVING")


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_model_dir, tmp_path) -> None:
    """Started the way `make run` starts it (scripts/run_stack.sh: sidecar, then service)."""
    port, sidecar_port, prom_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parent.parent),
        "SPECDEC_LISTEN": f"127.0.0.1:{port}",
        "SPECDEC_SIDECAR_LISTEN": f"127.0.0.1:{sidecar_port}",
        "SPECDEC_SIDECAR_PROMETHEUS_ADDRESS": f"127.0.0.1:{prom_port}",
        "SPECDEC_MODEL": str(tiny_model_dir),
        "SPECDEC_DTYPE": "float32",
        "SPECDEC_DEVICE": "cpu",
        "SPECDEC_MAX_BATCH_SIZE": "4",
        # Long enough for 1,500 tokens on a slow or busy machine: the test is about draining,
        # not about how fast this processor decodes.
        "SPECDEC_GRACE_PERIOD_S": "300",
    }
    log = open(tmp_path / "stack.log", "wb")
    stack = subprocess.Popen(
        [str(REPO / "scripts" / "run_stack.sh")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address)
        results: dict[int, object] = {}
        streaming = [threading.Event() for _ in range(3)]

        def generate(i: int) -> None:
            with grpc.insecure_channel(address) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                try:
                    responses = []
                    for response in stub.Generate(
                        generation_pb2.GenerateRequest(
                            text=f"The quick brown fox {i}",
                            max_tokens=1500,
                            speculation=generation_pb2.SpeculationParams(
                                method=metrics_pb2.SPECULATION_METHOD_NONE
                            ),
                        ),
                        timeout=300,  # as the grace period: this test is about draining, not speed
                    ):
                        responses.append(response)
                        streaming[i].set()
                    results[i] = responses[-1]
                except grpc.RpcError as exc:
                    results[i] = exc
                    streaming[i].set()

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for event in streaming:  # every request is in flight
            assert event.wait(60)
        os.kill(stack.pid, signal.SIGTERM)
        assert stack.wait(330) == 0
        for thread in threads:
            thread.join(10)
        for i, result in results.items():
            assert isinstance(result, generation_pb2.GenerateResponse), f"request {i}: {result}"
            assert result.HasField("final") and result.final.completion_tokens > 0
        assert len(results) == 3
        # New work after the drain is refused (the server is gone).
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            list(
                generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    generation_pb2.GenerateRequest(text="late"), timeout=3
                )
            )
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "stack.log").read_text()
    assert "draining" in text and "request_finished" in text, text[-3000:]


LOADS_FOR_A_MINUTE = """
import asyncio, sys, time
from service import server
from service.config import ServiceConfig
from specdec_common.logging_setup import configure_logging

def slow_build(config):
    print("loading-started", flush=True)
    time.sleep(60)
    return server.build_engine(config)

if __name__ == "__main__":  # the engine's process (spawn) imports this file too
    configure_logging("INFO")
    asyncio.run(server.serve(ServiceConfig.from_args(sys.argv[1:]), slow_build))
"""


def test_sigterm_while_the_models_load_exits_at_once(tiny_model_dir, tmp_path) -> None:
    """Loading cannot be interrupted (a GGUF conversion, graph capture): the process must
    not wait for it after a SIGTERM, or it outlives a container's kill grace period."""
    port = free_port()
    script = tmp_path / "slow_server.py"
    script.write_text(LOADS_FOR_A_MINUTE)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            str(tiny_model_dir),
            "--telemetry-target",
            "",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 60
        while b"loading-started" not in (tmp_path / "server.log").read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp_path / "server.log"
            ).read_text()
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.wait(20) == 0
        assert time.monotonic() - started < 15
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "draining" in text and "stopped" in text, text[-3000:]


def test_a_load_that_ends_after_the_stop_is_handed_to_abandoned() -> None:
    """The service stopped while loading (the awaiting task was cancelled): the engine the
    load then returns must still be stopped, not left running."""
    from service.server import _on_daemon_thread

    release, abandoned = threading.Event(), []

    async def stop_while_loading() -> None:
        loading = asyncio.ensure_future(
            _on_daemon_thread(lambda: release.wait(10) and "engine", abandoned=abandoned.append)
        )
        await asyncio.sleep(0.05)
        loading.cancel()
        release.set()
        deadline = time.monotonic() + 10
        while not abandoned and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(stop_while_loading())
    assert abandoned == ["engine"]

    async def load() -> object:  # and a load that is awaited delivers its result, or its error
        return await _on_daemon_thread(lambda: "engine", abandoned=abandoned.append)

    assert asyncio.run(load()) == "engine"

    async def fail() -> object:
        return await _on_daemon_thread(lambda: 1 / 0, abandoned=abandoned.append)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(fail())
    assert abandoned == ["engine"]


def test_a_load_that_ends_in_the_turn_the_stop_arrives_is_stopped(tiny_model_dir, monkeypatch) -> None:
    """serve() cancels start() when the stop wins; if the load delivered its engine in that
    same turn of the loop, start() holds the engine and must stop it."""
    from service import server
    from tests.service.conftest import service_config

    stopped: list[float] = []

    class Engine:
        def stop(self, grace: float) -> None:
            stopped.append(grace)

    loads: list[asyncio.Future] = []
    on_daemon_thread = server._on_daemon_thread

    def recorded(*args, **kwargs) -> asyncio.Future:
        loads.append(on_daemon_thread(*args, **kwargs))
        return loads[-1]

    monkeypatch.setattr(server, "_on_daemon_thread", recorded)

    async def stop_as_the_load_ends() -> None:
        service = server.Service(service_config(tiny_model_dir), lambda config: (Engine(), None))
        starting = asyncio.ensure_future(service.start())
        while not loads or not loads[0].done():  # the load has delivered; start() has not resumed
            await asyncio.sleep(0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert service.engine is None
        await service.server.stop(0)

    asyncio.run(stop_as_the_load_ends())
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped == [0.0]
