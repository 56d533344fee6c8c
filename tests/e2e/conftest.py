"""Fixtures for the end-to-end telemetry tests: the real service (in-process, tiny model,
real gRPC) reporting to a real sidecar subprocess (`python -m telemetry`) that exports over
OTLP/gRPC, in ack-after-export mode, to an OTLP receiver built in the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from testkit.tiny_model import save_tiny_model
from tests.service.conftest import ServiceThread, service_config
from tests.support.metrics_invariants import assert_stream_provenance
from tests.telemetry.support import OtlpGrpcReceiver, SidecarProcess

EXPORT_INTERVAL_MS = 300
NGRAM = metrics_pb2.SPECULATION_METHOD_NGRAM
NONE = metrics_pb2.SPECULATION_METHOD_NONE


@pytest.fixture(scope="session")
def e2e_model_dir(tmp_path_factory) -> Path:
    # No EOS: every generation runs to max_tokens (the client chooses the work per request).
    return save_tiny_model(tmp_path_factory.mktemp("e2e-tiny-model"), seed=0, layers=2, with_eos=False)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpGrpcReceiver]:
    r = OtlpGrpcReceiver()
    yield r
    r.close()


@pytest.fixture
def sidecar(otlp_receiver, tmp_path) -> Iterator[SidecarProcess]:
    """A `python -m telemetry` subprocess exporting OTLP/gRPC to `otlp_receiver` every
    EXPORT_INTERVAL_MS, acknowledging records only after the export that included them.
    Not started: the test calls start() (and kill()/start() again)."""
    p = SidecarProcess(
        extra_args=["--exporters", "otlp", "--ack-mode", "export", "--log-level", "WARNING"],
        env={**otlp_receiver.env(), "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS)},
        log_path=tmp_path / "sidecar.log",
    )
    yield p
    p.kill()


class TimedReport:
    """Wraps a MetricsReporter's report(): records how long each call took (it runs on the
    engine thread, inside the request's completion path)."""

    def __init__(self, reporter: Any) -> None:
        self.inner = reporter.report
        self.durations: list[float] = []
        reporter.report = self  # instance attribute shadows the method for Service._on_final

    def __call__(self, metrics: metrics_pb2.SpeculativeMetrics, trace: bytes = b"") -> None:
        t0 = time.perf_counter()
        self.inner(metrics, trace)
        self.durations.append(time.perf_counter() - t0)


@pytest.fixture
def start_service(e2e_model_dir, sidecar) -> Iterator[Callable[..., ServiceThread]]:
    """start_service(**config overrides) -> ServiceThread reporting to `sidecar` (whether it
    runs or not), with `.timed` (a TimedReport) on its reporter. Stopped before the sidecar
    fixture kills the sidecar, so the service's shutdown flush normally finds it alive."""
    started: list[ServiceThread] = []

    def start(**overrides: Any) -> ServiceThread:
        overrides.setdefault("telemetry_target", sidecar.address)
        overrides.setdefault("instance_id", "e2e-service")
        # These tests need drafts proposed and accepted; the adaptive policy may rightly
        # choose plain decoding for a tiny model on a busy CPU. Its own tests are elsewhere.
        overrides.setdefault("adaptive_draft_length", False)
        thread = ServiceThread(service_config(e2e_model_dir, **overrides))
        started.append(thread)
        thread.start()
        thread.timed = TimedReport(thread.service.reporter)
        return thread

    yield start
    for thread in started:
        thread.stop()


@dataclass
class Served:
    """One request as the client saw it."""

    request: generation_pb2.GenerateRequest
    final: generation_pb2.GenerateFinal
    start: float  # time.monotonic()
    end: float

    @property
    def latency(self) -> float:
        return self.end - self.start


def make_request(i: int, rng_choice: Callable[[list], Any]) -> generation_pb2.GenerateRequest:
    """A mixed workload: ngram (k 2..4) or no speculation, different max_tokens and
    prompts, greedy."""
    method = rng_choice([NGRAM, NGRAM, NONE])
    req = generation_pb2.GenerateRequest(
        request_id=f"e2e-{i}", text=rng_choice(PROMPTS) + f" #{i}", max_tokens=rng_choice([4, 8, 12, 16, 24])
    )
    req.sampling.temperature = 0.0
    req.speculation.method = method
    if method == NGRAM:
        req.speculation.num_draft_tokens = rng_choice([2, 3, 4])
    return req


PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(x, y):\n    return x + y\n\ndef add(x, y):\n",
    "Speculative decoding drafts tokens and verifies them. Speculative decoding",
    "The dog sleeps. The fox runs away. The dog sleeps. The fox",
    "a a a a a a a a",  # the n-gram drafter gets drafts accepted here (1..3 per pass)
]


def generate(
    stub: generation_pb2_grpc.GenerationServiceStub, req: generation_pb2.GenerateRequest, timeout: float = 60
) -> Served:
    start = time.monotonic()
    final = None
    chunks = []
    for response in stub.Generate(req, timeout=timeout):
        if response.HasField("final"):
            final = response.final
        else:
            chunks.append(response.chunk)
    end = time.monotonic()
    assert final is not None, f"{req.request_id}: no final message"
    assert_stream_provenance(chunks, final.metrics)  # marked + cut tokens = accepted_drafts
    return Served(req, final, start, end)


class Clients:
    """`n` client threads sending requests back to back (each with its own channel) until
    stop(); every request's outcome is kept (a final message, or the RpcError)."""

    def __init__(self, address: str, n: int, seed: int = 0) -> None:
        import random

        self.address = address
        self.served: list[Served] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = iter(range(10**9))
        self._rngs = [random.Random(seed * 1000 + t) for t in range(n)]
        self._threads = [
            threading.Thread(target=self._run, args=(t,), name=f"client-{t}", daemon=True) for t in range(n)
        ]

    def _run(self, t: int) -> None:
        rng = self._rngs[t]
        with grpc.insecure_channel(self.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._counter)
                try:
                    served = generate(stub, make_request(i, rng.choice))
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    with self._lock:
                        self.errors.append(exc)
                    return
                with self._lock:
                    self.served.append(served)

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 60) -> list[Served]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"
        return self.served

    def count(self) -> int:
        with self._lock:
            return len(self.served)
