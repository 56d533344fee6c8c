"""specdec-bench's pacings (service/client/loadgen/runner.py: burst and sustained) against an Engine in
this process, recorded as the same RequestRecords, so that service/client/loadgen/stats.py measures
in-process and gRPC runs by one definition (steady window, TTFT, inter-chunk latency).

The engine calls back on its own thread: a chunk's time is when the engine delivered it,
a request's start is just before Engine.submit.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from service.client.loadgen.runner import Pacing
from service.client.loadgen.stats import RequestRecord
from service.engine.api import EngineError, FinalResult, FinishReason, GenerationRequest
from specdec.v1 import metrics_pb2

# index -> the request to submit as the index-th of the run.
EngineRequestFactory = Callable[[int], GenerationRequest]


def run_inprocess(
    engine, make_request: EngineRequestFactory, pacing: Pacing, timeout_s: float
) -> tuple[float, list[RequestRecord]]:
    """Submits the run's requests; returns (the run's start time, the records in sending order).

    burst: `level` requests at once, `pacing.rounds` times (each round once the last one
    ended); sustained: `level` clients, each submitting its next request when its last one
    ended, `pacing.requests` each (or until `pacing.duration_s`).
    """
    if pacing.mode not in ("burst", "sustained"):
        raise ValueError(f"in-process runs pace burst or sustained, not {pacing.mode!r}")
    records: list[RequestRecord] = []
    ended: queue.SimpleQueue[RequestRecord] = queue.SimpleQueue()

    def submit(client: int) -> None:
        index = len(records)
        request = make_request(index)
        record = RequestRecord(index=index, client=client, start=time.perf_counter())
        records.append(record)

        def on_event(event) -> None:  # engine thread
            now = time.perf_counter()
            if isinstance(event, FinalResult):
                record.end = now
                record.finish_reason = metrics_pb2.FinishReason.Name(event.finish_reason.value)
                record.prompt_tokens, record.completion_tokens = event.prompt_tokens, event.completion_tokens
                record.metrics = event.metrics
                if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    record.status, record.error = event.finish_reason.name, event.error or ""
                ended.put(record)
            else:
                record.chunk_times.append(now)
                record.chunk_tokens.append(len(event.token_ids))

        try:
            engine.submit(request, on_event)
        except EngineError as exc:  # refused: recorded as a failure, the run goes on
            record.end, record.status, record.error = time.perf_counter(), type(exc).__name__, str(exc)
            ended.put(record)

    def next_end() -> RequestRecord:
        try:
            return ended.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"no request ended within {timeout_s} s "
                f"({sum(r.end is None for r in records)} of {len(records)} in flight)"
            ) from None

    run_start = time.perf_counter()
    clients = int(pacing.level)
    deadline = None if pacing.duration_s is None else run_start + pacing.duration_s
    for _ in range(pacing.rounds if pacing.mode == "burst" else 1):
        _run_round(pacing, clients, deadline, submit, next_end)
    return run_start, records


def _run_round(
    pacing: Pacing,
    clients: int,
    deadline: float | None,
    submit: Callable[[int], None],
    next_end: Callable[[], RequestRecord],
) -> None:
    """One burst, or the whole of a sustained run: every client submits, then (sustained)
    submits again as its requests end; returns when none is in flight."""
    sent = dict.fromkeys(range(clients), 0)
    for client in range(clients):
        submit(client)
        sent[client] += 1
    in_flight = clients
    while in_flight:
        record = next_end()
        in_flight -= 1
        client = record.client
        more = (
            pacing.mode == "sustained"
            and (pacing.requests is None or sent[client] < pacing.requests)
            and (deadline is None or time.perf_counter() < deadline)
        )
        if more:
            submit(client)
            sent[client] += 1
            in_flight += 1
