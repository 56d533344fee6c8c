"""Several gRPC front ends on one port (`--front-ends`): `specdec-server` as a child process,
the tiny model on the CPU, clients on connections of their own (the kernel spreads
connections, not calls, between the front ends). Every front end serves, reports its own
records, counts against one in-flight limit, drains on a SIGTERM to the first alone, and a
crash of any one stops the service non-zero, never a hang."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from service.config import ServiceConfig
from service.engine_process.in_flight import InFlightCount
from specdec.v1 import generation_pb2, generation_pb2_grpc
from testkit.processes import free_port, wait_for
from tests.service.test_engine_process import SERVING, RecordingSidecar, alive, health_status, log_events
from tests.service.test_engine_process import start_server as start_one_front_end_server
from tests.service.test_generate import NONE, request

CONNECTIONS = 24  # every one on the same front end: 2 * 2**-24 with two front ends


@pytest.fixture
def sidecar() -> Iterator[RecordingSidecar]:
    recording = RecordingSidecar()
    yield recording
    recording.server.stop(0)


def start_server(tiny_model_dir: Path, log_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    return start_one_front_end_server(tiny_model_dir, log_path, "--front-ends", "2", *args)


def serving_two_front_ends(
    tiny_model_dir: Path, log_path: Path, *args: str
) -> tuple[subprocess.Popen, str, int, int]:
    """A server with two front ends, once both serve: (server, address, core pid, second
    front end's pid). The server is killed if it does not get there."""
    server, address = start_server(tiny_model_dir, log_path, *args)
    try:
        wait_until_every_front_end_serves(log_path, address)
        [core] = started_pids(log_path, "engine_process_started")
        [second] = started_pids(log_path, "front_end_started")
    except BaseException:
        server.kill()
        raise
    return server, address, core, second


def own_channel(address: str) -> grpc.Channel:
    """A channel on a connection of its own (gRPC shares one per target by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def started_pids(log_path: Path, event: str) -> list[int]:
    return [e["pid"] for e in log_events(log_path) if e.get("event") == event]


def wait_until_every_front_end_serves(log_path: Path, address: str) -> None:
    """A health check reaches one front end (whichever the kernel picks); each logs "serving"."""
    wait_for(lambda: health_status(address) == SERVING, 120, what="SERVING")
    wait_for(
        lambda: (
            {e.get("process") for e in log_events(log_path) if e.get("event") == "serving"}
            == {"front_end_0", "front_end_1"}
        ),
        30,
        what="both front ends serving",
    )


def finished_by_front_end(log_path: Path) -> collections.Counter:
    return collections.Counter(
        e.get("process") for e in log_events(log_path) if e.get("event") == "request_finished"
    )


def test_two_front_ends_serve_report_and_drain_on_a_sigterm_to_the_first(
    tiny_model_dir, tmp_path, sidecar
) -> None:
    log_path = tmp_path / "server.log"
    server, address, core, second = serving_two_front_ends(
        tiny_model_dir, log_path, "--telemetry-target", f"127.0.0.1:{sidecar.port}", "--grace-period-s", "30"
    )
    try:
        channels = [own_channel(address) for _ in range(CONNECTIONS)]
        try:
            outputs = []
            for index, channel in enumerate(channels):
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                responses = list(
                    stub.Generate(request(max_tokens=6, method=NONE, request_id=f"r{index}"), timeout=60)
                )
                final = responses[-1].final
                assert final.completion_tokens == 6
                outputs.append([t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids])
            # One engine behind both: greedy output of the same prompt is the same wherever it came in.
            assert all(tokens == outputs[0] for tokens in outputs)
            # Calls in flight on four connections (on both front ends but with odds 1 in 8):
            # each finishes, its record reaches the sidecar.
            held = [
                generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    request(max_tokens=200, method=NONE, request_id=f"drained{i}"), timeout=60
                )
                for i, channel in enumerate(channels[:4])
            ]
            for call in held:
                next(call)
            server.send_signal(signal.SIGTERM)  # the first front end alone, as `docker stop` does
            assert [list(call)[-1].final.completion_tokens for call in held] == [200] * 4
        finally:
            for channel in channels:
                channel.close()
        assert server.wait(60) == 0
        wait_for(lambda: not alive(second) and not alive(core), 30, what="the other processes to exit")
    finally:
        if server.poll() is None:
            server.kill()
    by_front_end = finished_by_front_end(log_path)
    assert set(by_front_end) == {"front_end_0", "front_end_1"}, by_front_end
    assert sum(by_front_end.values()) == CONNECTIONS + 4
    stopped = [e.get("process") for e in log_events(log_path) if e.get("event") == "stopped"]
    assert sorted(stopped) == ["front_end_0", "front_end_1"]
    # Each front end reports its own requests under a source of its own, nothing lost or doubled.
    sources = collections.Counter(sidecar.source_of.values())
    assert len(sources) == 2, sources
    assert sorted(record.request_id for record in sidecar.records) == sorted(
        [f"r{i}" for i in range(CONNECTIONS)] + [f"drained{i}" for i in range(4)]
    )
    # Every process ended well: the service's exit code says so for all (a front end that
    # exits non-zero in the drain makes it non-zero).
    assert not [e for e in log_events(log_path) if e.get("event") in ("front_end_exited", "service_failed")]


def test_the_in_flight_limit_holds_for_every_front_end_together(tiny_model_dir, tmp_path) -> None:
    """One batch slot and one queue place: of long calls sent at once on 16 connections
    (spread between the two front ends by the kernel), exactly two are admitted and 14
    refused; a limit per front end would admit up to four (all 16 on one front end: 2**-15)."""
    log_path = tmp_path / "server.log"
    server, address, _, _ = serving_two_front_ends(
        tiny_model_dir, log_path, "--max-batch-size", "1", "--max-queue-size", "1"
    )
    channels = []
    try:
        channels = [own_channel(address) for _ in range(16)]
        calls = [
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                request(max_tokens=4000, method=NONE, request_id=f"held{i}"), timeout=120
            )
            for i, channel in enumerate(channels)
        ]
        # A refusal ends its call at once; an admitted call runs (or waits for the slot) for
        # seconds. Wait for 14 to end, then check that no more do meanwhile.
        wait_for(lambda: sum(call.done() for call in calls) >= 14, 60, what="14 refusals")
        time.sleep(0.5)
        ended = [call for call in calls if call.done()]
        assert len(ended) == 14, len(ended)
        assert {call.code() for call in ended} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for call in calls:
            call.cancel()
        # The places come back once the cancelled calls have left.
        stub = generation_pb2_grpc.GenerationServiceStub(channels[0])

        def admitted_again() -> bool:
            try:
                return list(stub.Generate(request(max_tokens=2, method=NONE), timeout=60))[-1].HasField(
                    "final"
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                return False

        wait_for(admitted_again, 30, what="a place in flight to come back")
    finally:
        for channel in channels:
            channel.close()
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM, and the exit code 0; a server that does not exit is killed (and fails)."""
    server.send_signal(signal.SIGTERM)
    try:
        assert server.wait(60) == 0
    except subprocess.TimeoutExpired:
        server.kill()
        raise


def test_sighup_to_the_first_front_end_reloads_every_front_ends_tokens(tiny_model_dir, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token-0123456789abcdef\n")
    log_path = tmp_path / "server.log"
    server, address, _, _ = serving_two_front_ends(
        tiny_model_dir, log_path, "--auth-tokens-file", str(tokens)
    )
    channels = []
    try:
        tokens.write_text("second-token-0123456789abcdef\n")
        server.send_signal(signal.SIGHUP)
        channels = [own_channel(address) for _ in range(CONNECTIONS)]
        stubs = [generation_pb2_grpc.GenerationServiceStub(channel) for channel in channels]

        def answered(token: str) -> list[bool]:
            out = []
            for stub in stubs:
                try:
                    stub.GetServerInfo(
                        generation_pb2.GetServerInfoRequest(),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=10,
                    )
                    out.append(True)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.details()
                    out.append(False)
            return out

        # On all 24 connections, whichever front end each reached: the new token only.
        wait_for(lambda: all(answered("second-token-0123456789abcdef")), 30, what="the new token everywhere")
        assert not any(answered("first-token-0123456789abcdef"))
    finally:
        for channel in channels:
            channel.close()
        stop(server)


def test_a_second_front_end_refuses_a_port_another_server_listens_on(tmp_path) -> None:
    """gRPC servers turn SO_REUSEPORT on by default; the front ends' would join one."""
    from service.server import check_port_free

    port = free_port()
    check_port_free(f"127.0.0.1:{port}")
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # default options
    other.add_insecure_port(f"127.0.0.1:{port}")
    other.start()
    try:
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            check_port_free(f"127.0.0.1:{port}")
    finally:
        other.stop(0)


def test_a_killed_front_end_stops_the_service_non_zero(tiny_model_dir, tmp_path) -> None:
    log_path = tmp_path / "server.log"
    server, _, core, second = serving_two_front_ends(tiny_model_dir, log_path)
    try:
        os.kill(second, signal.SIGKILL)
        assert server.wait(30) != 0  # the core went with its pipe, and the first front end with it
        wait_for(lambda: not alive(core), 10, what="the engine process to exit")
    finally:
        if server.poll() is None:
            server.kill()
    events = log_events(log_path)
    assert any(e.get("event") == "engine_core_front_end_gone" for e in events)
    assert any(
        e.get("event") == "engine_process_exited" and e.get("process") == "front_end_0" for e in events
    )


def test_a_sigterm_to_another_front_end_stops_the_whole_service(tiny_model_dir, tmp_path) -> None:
    """Its drain stops the one engine, so the first front end stops too (exit 0), not serving
    on with every call refused."""
    log_path = tmp_path / "server.log"
    server, _, core, second = serving_two_front_ends(tiny_model_dir, log_path)
    try:
        os.kill(second, signal.SIGTERM)
        assert server.wait(60) == 0
        wait_for(lambda: not alive(second) and not alive(core), 30, what="the other processes to exit")
    finally:
        if server.poll() is None:
            server.kill()
    events = log_events(log_path)
    assert any(
        e.get("event") == "engine_stopped_by_another_front_end" and e.get("process") == "front_end_0"
        for e in events
    )
    assert sorted(e.get("process") for e in events if e.get("event") == "stopped") == [
        "front_end_0",
        "front_end_1",
    ]


def test_a_model_that_fails_to_load_fails_the_start_and_leaves_no_process(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    log_path = tmp_path / "server.log"
    server, _ = start_server(missing, log_path)
    try:
        assert server.wait(120) == 1
    finally:
        if server.poll() is None:
            server.kill()
    events = log_events(log_path)
    [failed] = [e for e in events if e.get("event") == "service_failed" and e.get("process") == "front_end_0"]
    assert str(missing) in failed["error"] and "front end" not in failed["error"], failed["error"]
    for pid in started_pids(log_path, "engine_process_started") + started_pids(log_path, "front_end_started"):
        wait_for(lambda pid=pid: not alive(pid), 30, what=f"process {pid} to exit")


def _take_all(count: InFlightCount, limit: int, taken) -> None:  # a spawned child
    while count.try_take(limit):
        taken.value += 1


def test_the_in_flight_count_is_one_count_across_processes() -> None:
    context = multiprocessing.get_context("spawn")
    count = InFlightCount(context)
    assert count.try_take(3)
    taken = context.Value("i", 0)
    child = context.Process(target=_take_all, args=(count, 3, taken))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and taken.value == 2  # the child took what was left of 3
    assert count.count == 3 and not count.try_take(3)
    count.give_back(3)
    assert count.count == 0 and count.try_take(1)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--engine-process", "thread"], "--front-ends above 1 needs --engine-process process"),
        (["--listen", "unix:/tmp/specdec.sock"], "--front-ends above 1 needs a host:port --listen address"),
    ],
)
def test_several_front_ends_need_the_engine_process_and_a_port(args, problem, capsys) -> None:
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(["--front-ends", "2", *args], environ={})
    assert problem in capsys.readouterr().err
