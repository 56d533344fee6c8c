"""Drain on stop (SIGTERM): requests still queued get UNAVAILABLE at once, so their clients
retry on another replica; running requests finish within the grace period."""

from __future__ import annotations

import threading
import time

import grpc

from specdec.v1 import metrics_pb2
from tests.service.test_generate import NONE, request


def test_stop_refuses_queued_requests_at_once_and_finishes_the_running_one(run_service, make_stub) -> None:
    # The grace period is far longer than 3,000 tokens take on any machine, however busy: the
    # test is about who waits for the drain, not about how fast this processor decodes.
    service = run_service(max_batch_size=1, grace_period_s=600)
    stub = make_stub(service.address)
    running = stub.Generate(request(max_tokens=3000, method=NONE), timeout=660)
    next(running)  # the first chunk arrived: this request holds the only batch slot
    outcomes: dict[int, tuple] = {}

    def queued(index: int) -> None:
        try:
            responses = list(stub.Generate(request(max_tokens=2), timeout=180))
            outcomes[index] = ("served", time.monotonic(), responses[-1].final.finish_reason)
        except grpc.RpcError as exc:
            outcomes[index] = (exc.code(), time.monotonic(), exc.details())

    threads = [threading.Thread(target=queued, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while service.service.engine.queue_depth() < 2:
        assert time.monotonic() < deadline, "the requests did not queue"
        time.sleep(0.01)
    stop_requested = time.monotonic()
    service.request_stop()
    for thread in threads:
        thread.join(60)
    responses = list(running)  # the running request streams on to its end
    running_finished = time.monotonic()
    final = responses[-1].final
    assert final.finish_reason == metrics_pb2.FINISH_REASON_LENGTH and final.completion_tokens == 3000
    for index, (code, at, details) in outcomes.items():
        assert code == grpc.StatusCode.UNAVAILABLE, (index, code, details)
        assert "shut down" in details
        assert at < running_finished, "a queued request waited for the drain"
        assert at - stop_requested < 10
    assert len(outcomes) == 2
