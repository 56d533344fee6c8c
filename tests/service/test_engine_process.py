"""The engine in a process of its own (--engine-process process, the default) against the engine
on a thread of the server (thread): the same behaviour through gRPC in both modes, and in
process mode a crash of either process is detected, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.v1 import generation_pb2_grpc, metrics_pb2, telemetry_pb2, telemetry_pb2_grpc
from testkit.processes import env_with_this_checkout, free_port, wait_for
from tests.service.conftest import ServiceThread, service_config
from tests.service.test_generate import NGRAM, NONE, collect, request
from tests.support.metrics_invariants import assert_metrics_invariants

MODES = ("thread", "process")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sidecar() -> Iterator[RecordingSidecar]:
    recording = RecordingSidecar()
    yield recording
    recording.server.stop(0)


@pytest.fixture(scope="module")
def servers(tiny_model_dir, sidecar) -> Iterator[dict[str, ServiceThread]]:
    """One server per mode, one batch slot and one queue place each (tests leave them idle),
    both reporting to `sidecar`."""
    started = {
        mode: ServiceThread(
            service_config(
                tiny_model_dir,
                engine_process=mode,
                max_batch_size=1,
                max_queue_size=1,
                telemetry_target=f"127.0.0.1:{sidecar.port}",
                instance_id=f"test-{mode}",
            )
        ).start()
        for mode in MODES
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def stubs() -> Iterator[dict[str, generation_pb2_grpc.GenerationServiceStub]]:
    channels: dict[str, grpc.Channel] = {}

    def stub(address: str) -> generation_pb2_grpc.GenerationServiceStub:
        channels.setdefault(address, grpc.insecure_channel(address))
        return generation_pb2_grpc.GenerationServiceStub(channels[address])

    yield stub
    for channel in channels.values():
        channel.close()


def tokens(stub, req) -> list[int]:
    chunks, final, _ = collect(stub, req, timeout=60)
    assert_metrics_invariants(final.metrics)
    return [t for chunk in chunks for t in chunk.token_ids]


def test_the_engine_process_generates_the_thread_modes_tokens(servers, stubs) -> None:
    """Greedy float32: the same tokens whichever process decodes, with and without drafts."""
    for method in (NONE, NGRAM):
        req = request(max_tokens=40, method=method)
        expected = tokens(stubs(servers["thread"].address), req)
        assert len(expected) == 40
        assert tokens(stubs(servers["process"].address), req) == expected, method


@pytest.mark.parametrize("mode", MODES)
def test_a_cancelled_stream_frees_the_slot_and_is_reported(servers, stubs, sidecar, mode) -> None:
    server = servers[mode]
    stub = stubs(server.address)
    request_id = f"cancelled-{mode}"
    call = stub.Generate(request(max_tokens=4000, method=NONE, request_id=request_id), timeout=60)
    next(call)  # holds the only slot
    call.cancel()
    _, final, _ = collect(stub, request(max_tokens=4), timeout=60)  # served once the slot is free
    assert final.completion_tokens == 4
    records = wait_for(
        lambda: [r for r in sidecar.records if r.request_id == request_id], 20, what="the cancelled record"
    )
    assert len(records) == 1 and records[0].finish_reason == metrics_pb2.FINISH_REASON_CANCELLED
    assert 0 < records[0].completion_tokens < 4000
    assert_metrics_invariants(records[0])


@pytest.mark.parametrize("mode", MODES)
def test_a_deadline_ends_the_request_and_frees_the_slot(servers, stubs, mode) -> None:
    stub = stubs(servers[mode].address)
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, request(max_tokens=4000, method=NONE), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, final, _ = collect(stub, request(max_tokens=4), timeout=60)
    assert final.completion_tokens == 4


@pytest.mark.parametrize("mode", MODES)
def test_a_full_queue_is_resource_exhausted(servers, stubs, mode) -> None:
    server = servers[mode]
    stub = stubs(server.address)
    running = stub.Generate(request(max_tokens=4000, method=NONE), timeout=60)
    next(running)  # the slot
    queued = stub.Generate(request(max_tokens=2, method=NONE), timeout=60)  # the queue place
    wait_for(lambda: server.service.engine.queue_depth() == 1, 30, what="the second request to queue")
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, request(max_tokens=2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "queue is full" in info.value.details()
    running.cancel()
    assert list(queued)[-1].final.completion_tokens == 2


def test_a_model_that_fails_to_load_fails_the_start_with_the_same_error(tiny_model_dir, tmp_path) -> None:
    errors = {}
    for mode in MODES:
        server = ServiceThread(
            service_config(tiny_model_dir, engine_process=mode, model=str(tmp_path / "absent"))
        )
        with pytest.raises(Exception) as info:
            server.start()
        errors[mode] = info.value
    assert type(errors["thread"]).__name__ == "ModelLoadError"
    assert type(errors["process"]).__name__ == "EngineStartError"
    assert str(errors["process"]) == str(errors["thread"]) and "absent" in str(errors["thread"])


def test_the_linear_blocks_setting_reaches_the_engine_in_both_modes(tiny_model_dir, tmp_path) -> None:
    """The engine core gets the service's settings: a bad --linear-blocks file fails its start
    with the engine's own error, naming the file (a setting that did not reach it would not)."""
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps({"entries": [{"n": 64, "k": 64, "gemv": {"bn": 3, "bk": 256, "warps": 4}}]}))
    errors = {}
    for mode in MODES:
        server = ServiceThread(service_config(tiny_model_dir, engine_process=mode, linear_blocks=str(path)))
        with pytest.raises(Exception) as info:
            server.start()
        errors[mode] = info.value
    assert type(errors["thread"]).__name__ == "ValueError"
    assert type(errors["process"]).__name__ == "EngineStartError"
    assert str(errors["process"]) == str(errors["thread"])
    assert str(path) in str(errors["thread"]) and "gemv.bn must be a positive power of two" in str(
        errors["thread"]
    )


class RecordingSidecar(telemetry_pb2_grpc.TelemetryServiceServicer):
    """A sidecar that acknowledges every record and keeps its metrics, and the source of each
    request id."""

    def __init__(self) -> None:
        self.records: list = []
        self.source_of: dict[str, str] = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Report(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        for batch in request_iterator:
            self.records.extend(record.metrics for record in batch.records)
            self.source_of.update((record.metrics.request_id, batch.source_id) for record in batch.records)
            yield telemetry_pb2.ReportResponse(
                acknowledged_through_sequence=max(r.sequence for r in batch.records),
                accepted=len(batch.records),
            )


@pytest.mark.parametrize("mode", MODES)
def test_not_serving_while_loading_then_drain_reports_the_last_record(tiny_model_dir, mode) -> None:
    """Health NOT_SERVING while the engine loads; on stop the running request finishes and its
    metrics record reaches the sidecar before the service has stopped."""
    from service import server as server_module

    sidecar = RecordingSidecar()
    release = threading.Event()

    def slow_build(config):
        assert release.wait(60)
        return server_module.build_engine(config)

    server = ServiceThread(
        service_config(
            tiny_model_dir,
            engine_process=mode,
            telemetry_target=f"127.0.0.1:{sidecar.port}",
            grace_period_s=60.0,
        ),
        slow_build,
    ).start(wait_ready=False)
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
            release.set()
            server.wait_ready(120)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            call = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                request(max_tokens=300, method=NONE, request_id="drained"), timeout=60
            )
            next(call)
            server.stop()  # returns once the service has stopped: drained, metrics flushed
            final = list(call)[-1].final
        assert final.completion_tokens == 300
        assert [r.request_id for r in sidecar.records] == ["drained"]
        assert sidecar.records[0].completion_tokens == 300
        assert_metrics_invariants(sidecar.records[0])
    finally:
        release.set()
        server.stop()
        sidecar.server.stop(0)


# ---- crashes: `specdec-server` as a child process, the engine in its own ----------------------


def start_server(
    tiny_model_dir: Path, log_path: Path, *args: str, **popen: object
) -> tuple[subprocess.Popen, str]:
    """`specdec-server` on the tiny model, the CPU and a free port, JSON lines into `log_path`;
    `args`: more flags."""
    port = free_port()
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            str(tiny_model_dir),
            *args,
        ],
        cwd=REPO,
        env=env_with_this_checkout(
            {
                "SPECDEC_TELEMETRY_TARGET": "",
                "SPECDEC_DEVICE": "cpu",
                "SPECDEC_DTYPE": "float32",
                "SPECDEC_LOG_FORMAT": "json",
                "SPECDEC_ENGINE_PROCESS": "process",
            }
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        **popen,
    )
    log.close()
    return server, f"127.0.0.1:{port}"


def log_events(log_path: Path) -> list[dict]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def core_pid(log_path: Path) -> int | None:
    started = [e for e in log_events(log_path) if e.get("event") == "engine_process_started"]
    return started[0]["pid"] if started else None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state and " Z" not in state


def health_status(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            )
    except grpc.RpcError:
        return None


def test_a_killed_engine_process_ends_streams_unavailable_and_the_server_exits_non_zero(
    tiny_model_dir, tmp_path
) -> None:
    log_path = tmp_path / "server.log"
    server, address = start_server(tiny_model_dir, log_path)
    try:
        wait_for(lambda: health_status(address) == SERVING, 120, what="SERVING")
        pid = core_pid(log_path)
        assert pid is not None and alive(pid)
        with grpc.insecure_channel(address) as channel:
            statuses: list[int] = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

            def record() -> None:
                try:
                    statuses.extend(response.status for response in watch)
                except grpc.RpcError:
                    pass  # the server went away

            watcher = threading.Thread(target=record, daemon=True)
            watcher.start()
            call = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                request(max_tokens=4000, method=NONE), timeout=60
            )
            next(call)  # in flight
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert time.monotonic() - killed < 10
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "engine process exited with code -9" in info.value.details()
            assert server.wait(30) != 0
            watcher.join(10)
        assert statuses[0] == SERVING and NOT_SERVING in statuses, statuses
    finally:
        if server.poll() is None:
            server.kill()
    exited = [e for e in log_events(log_path) if e.get("event") == "engine_process_exited"]
    assert len(exited) == 1 and exited[0]["exit_code"] == -signal.SIGKILL, exited


def test_a_killed_front_end_takes_the_engine_process_with_it(tiny_model_dir, tmp_path) -> None:
    log_path = tmp_path / "server.log"
    server, address = start_server(tiny_model_dir, log_path)
    try:
        wait_for(lambda: health_status(address) == SERVING, 120, what="SERVING")
        pid = core_pid(log_path)
        assert pid is not None and alive(pid)
        server.kill()
        server.wait(10)
        wait_for(lambda: not alive(pid), 10, what="the engine process to exit")
    finally:
        if server.poll() is None:
            server.kill()


def test_sigterm_while_the_engine_process_loads_exits_at_once(tiny_model_dir, tmp_path) -> None:
    log_path = tmp_path / "server.log"
    server, _ = start_server(tiny_model_dir, log_path)
    try:
        pid = wait_for(lambda: core_pid(log_path), 60, what="the engine process to start")
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        wait_for(lambda: not alive(pid), 10, what="the engine process to exit")
    finally:
        if server.poll() is None:
            server.kill()
    events = [e.get("event") for e in log_events(log_path)]
    assert "serving" not in events and "stopped" in events, events


def test_sigterm_to_the_whole_process_group_still_drains(tiny_model_dir, tmp_path) -> None:
    """systemd's default KillMode, or a script's `kill -- -PGID`, signals both processes: the
    engine process must outlive the front end's drain, not die with the signal."""
    log_path = tmp_path / "server.log"
    server, address = start_server(tiny_model_dir, log_path, start_new_session=True)
    try:
        wait_for(lambda: health_status(address) == SERVING, 120, what="SERVING")
        pid = core_pid(log_path)
        with grpc.insecure_channel(address) as channel:
            call = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                request(max_tokens=200, method=NONE), timeout=60
            )
            next(call)
            os.killpg(server.pid, signal.SIGTERM)
            final = list(call)[-1].final
        assert final.completion_tokens == 200
        assert server.wait(30) == 0
        wait_for(lambda: not alive(pid), 10, what="the engine process to exit")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
