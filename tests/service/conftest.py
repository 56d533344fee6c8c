"""Real gRPC servers on loopback with a tiny random model loaded through the real loader."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.config import ServiceConfig
from specdec.v1 import generation_pb2_grpc
from testkit.tiny_model import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # No EOS and a 4,096-token context: requests run to max_tokens, so the tests control how
    # long one stays in flight (thousands of tokens take seconds even on a fast CPU).
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-model"), seed=0, layers=2, with_eos=False, max_position=4096
    )


def service_config(model_dir: Path, **overrides: Any) -> ServiceConfig:
    base = ServiceConfig.from_args(
        [
            "--listen",
            "127.0.0.1:0",
            "--model",
            str(model_dir),
            "--telemetry-target",
            "",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--instance-id",
            "test-instance",
            "--grace-period-s",
            "20",
            # The engine on a thread of the server: starts in a fraction of the time. The
            # product's default, the engine in a process of its own, is covered by
            # test_engine_process.py (both modes) and by every test that starts `specdec-server`.
            "--engine-process",
            "thread",
        ],
        environ={},
    )
    return dataclasses.replace(base, **overrides)


class ServiceThread:
    """Runs service.server.Service on its own event loop in a thread."""

    def __init__(self, config: ServiceConfig, build_engine: Callable | None = None) -> None:
        self.config = config
        self._build_engine = build_engine
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._started_listening = threading.Event()
        self.error: BaseException | None = None
        self.service: Any = None
        self._thread = threading.Thread(target=self._run, name="service", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from service import server

        try:
            # a slow or failing load, or a wrapped engine
            self.service = server.Service(self.config, self._build_engine or server.build_engine)
            self._started_listening.set()
            await self.service.start()
            self._ready.set()
            await self.service.wait_for_stop()
            await self.service.stop()
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
            self._started_listening.set()
            self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    def start(self, wait_ready: bool = True) -> ServiceThread:
        self._thread.start()
        self._started_listening.wait(60)
        if wait_ready:
            assert self._ready.wait(300), "service did not become ready"
        if self.error:
            raise self.error
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        assert self._ready.wait(timeout)
        if self.error:
            raise self.error

    def request_stop(self) -> None:
        self._loop.call_soon_threadsafe(self.service.request_stop)

    def stop(self, timeout: float = 60) -> None:
        if self._thread.is_alive():
            self.request_stop()
            self._thread.join(timeout)
        assert not self._thread.is_alive(), "service did not stop"
        if self.error:
            raise self.error


@pytest.fixture
def run_service(tiny_model_dir) -> Iterator[Callable[..., ServiceThread]]:
    started: list[ServiceThread] = []

    def start(
        build_engine: Callable | None = None, wait_ready: bool = True, **overrides: Any
    ) -> ServiceThread:
        thread = ServiceThread(service_config(tiny_model_dir, **overrides), build_engine)
        started.append(thread)
        return thread.start(wait_ready=wait_ready)

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def make_stub() -> Iterator[Callable[[str], generation_pb2_grpc.GenerationServiceStub]]:
    channels: list[grpc.Channel] = []

    def make(address: str) -> generation_pb2_grpc.GenerationServiceStub:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return generation_pb2_grpc.GenerationServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
