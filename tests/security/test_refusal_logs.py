"""Refused requests leave one structured log line each, rate-limited by lines and bytes, and
no caller-chosen string reaches the log whole (issue 20, finding 11)."""

from __future__ import annotations

import grpc
import pytest
import structlog

from specdec.v1 import generation_pb2, telemetry_pb2
from specdec_security.log_limit import LogLimiter, clip
from tests.telemetry.mutations import base_record
from tests.telemetry.support import wait_for

REPORT = "/specdec.v1.TelemetryService/Report"
GENERATE = "/specdec.v1.GenerationService/Generate"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_counts_lines_per_key_and_bytes_over_all_keys() -> None:
    clock = Clock()
    limiter = LogLimiter(period_s=10, burst=3, max_bytes=1000, clock=clock)
    lines: list[tuple[str, dict]] = []

    def write(event, **fields):
        lines.append((event, fields))

    for _ in range(5):
        limiter.log(write, "refused", "a", detail="x")
    assert len(lines) == 3  # burst per key
    assert limiter.log(write, "refused", "b", detail="y" * 900)  # another key, within bytes
    assert not limiter.log(write, "refused", "c", detail="z" * 200)  # over the byte budget
    clock.now = 10.0  # a new window: the first line says how many were left out
    assert limiter.log(write, "refused", "a", detail="x")
    assert lines[-1][1]["not_logged"] == 2
    assert limiter.log(write, "refused", "c", detail="z")
    assert lines[-1][1]["not_logged"] == 1


def test_clip_keeps_the_head_and_names_the_length() -> None:
    assert clip("short") == "short"
    clipped = clip("s" * 100_000)
    assert clipped.startswith("s" * 64) and clipped.endswith("(100000 chars)") and len(clipped) < 100


def raw_report(channel: grpc.Channel, payloads: list[bytes]):
    call = channel.stream_stream(
        REPORT, request_serializer=None, response_deserializer=telemetry_pb2.ReportResponse.FromString
    )
    return list(call(iter(payloads), timeout=30))


def test_the_sidecar_logs_a_refused_batch_once_and_never_a_whole_id(sidecar_process_factory) -> None:
    sidecar = sidecar_process_factory(["--exporters", "prometheus", "--prometheus-address", "127.0.0.1:0"])
    with grpc.insecure_channel(sidecar.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            raw_report(channel, [b"\xff\xff garbage"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        size_before = len(sidecar.log_tail(10_000_000))
        # The case: 100 KB ids made 5 MB of log in 10 s. Here 200 batches, each with
        # a 100 KB source id (rejected whole) or records with 100 KB request ids.
        long_id = "i" * 100_000
        batches = []
        for n in range(200):
            req = telemetry_pb2.ReportRequest(source_id=long_id if n % 2 else f"src-{n}")
            m = base_record()
            m.request_id = long_id
            req.records.add(sequence=1).metrics.CopyFrom(m)
            batches.append(req.SerializeToString())
        assert len(raw_report(channel, batches)) == 200
    assert sidecar.terminate() == 0
    log = sidecar.log_tail(10_000_000)
    refused = [line for line in log.splitlines() if "request_refused" in line]
    assert len(refused) == 1 and "INVALID_ARGUMENT" in refused[0] and "Report" in refused[0]
    assert "i" * 65 not in log
    assert len(log) - size_before < 20_000  # the byte budget of one 10 s window, and a bit


def test_the_service_logs_each_refused_request(run_service, make_stub) -> None:
    service = run_service()
    with structlog.testing.capture_logs() as logs:
        with grpc.insecure_channel(service.address) as channel:
            generate = channel.unary_stream(
                GENERATE,
                request_serializer=None,
                response_deserializer=generation_pb2.GenerateResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(generate(b"\x12\x10abc", timeout=30))  # truncated: does not parse
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = make_stub(service.address)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(generation_pb2.GenerateRequest(text="hi", request_id="x" * 200), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def refused_lines():
            return [entry for entry in logs if entry["event"] == "request_refused"]

        # the line is written when the server has finished the call, just after the client
        # saw its status
        wait_for(lambda: len(refused_lines()) >= 2, 10, what="two request_refused lines")
    refused = refused_lines()
    assert [entry["code"] for entry in refused] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert all(entry["method"] == GENERATE for entry in refused)
    assert all(len(entry["details"]) < 300 for entry in refused)


def test_the_service_logs_a_full_queue_refusal(run_service, make_stub) -> None:
    from tests.service.test_generate import collect, full_queue, request

    service = run_service(max_batch_size=1, max_queue_size=1)
    stub = make_stub(service.address)
    with structlog.testing.capture_logs() as logs, full_queue(service, stub):
        with pytest.raises(grpc.RpcError) as info:
            collect(stub, request(max_tokens=2))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_for(
            lambda: any(e["event"] == "request_refused" for e in logs), 10, what="request_refused logged"
        )
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert len(refused) == 1 and refused[0]["code"] == "RESOURCE_EXHAUSTED"
    assert "queue is full" in refused[0]["details"]


class _EndingContext:
    """A servicer context whose call is released once it is done: peer() then fails, as
    reading a released call would (the crash CI saw in the done callback)."""

    def __init__(self) -> None:
        self.callbacks = []
        self.released = False

    def peer(self) -> str:
        if self.released:
            raise RuntimeError("peer() read after the call was released")
        return "ipv4:127.0.0.1:5555"

    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "queue full"

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        self.released = True
        for callback in self.callbacks:
            callback(self)


def test_the_refusal_line_reads_the_peer_while_the_call_is_alive() -> None:
    from specdec_security.refusal_log import RefusalLogInterceptor

    lines = []

    class Limiter:
        def log(self, write, event, key, **fields) -> bool:
            lines.append((event, fields))
            return True

    context = _EndingContext()
    RefusalLogInterceptor(Limiter())._watch("/specdec.v1.GenerationService/Generate", context)
    context.finish()
    assert lines == [
        (
            "request_refused",
            {
                "method": "/specdec.v1.GenerationService/Generate",
                "peer": "ipv4:127.0.0.1:5555",
                "code": "RESOURCE_EXHAUSTED",
                "details": "queue full",
            },
        )
    ]
