"""Sending the load: one streamed request, and the three ways of pacing them.

- burst: `level` requests sent at once, `rounds` times (each round once the last ended);
- sustained (closed loop): `level` clients, each sending its next request as soon as its
  last one ended, for a number of requests each or until a duration has passed;
- rate (open loop): arrivals at `level` requests/s with exponential gaps (a Poisson
  process), each sent at its time whatever is still in flight, until a count or duration.

Requests go through one or more connections (`stubs`, one per channel): the requests of
client c (a burst's c-th request of each round, a sustained client's every request, the rate
mode's c-th arrival) through stubs[c % len(stubs)].

A failed request (any gRPC status, or a stream that ended without its final message) is
recorded with its status code and the run goes on.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from service.client.loadgen.stats import RequestRecord
from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from specdec_security.client import Metadata

INCOMPLETE_STREAM = "INCOMPLETE_STREAM"

# index -> the request to send as the index-th of the run.
RequestFactory = Callable[[int], generation_pb2.GenerateRequest]


@dataclass(frozen=True)
class Pacing:
    mode: str  # burst | sustained | rate
    level: float  # requests at once (burst), clients (sustained) or requests/s (rate)
    requests: int | None = None  # sustained: per client; rate: in all
    duration_s: float | None = None  # sustained / rate: stop sending after this
    arrival_seed: int = 0  # rate: the arrival times' random seed
    rounds: int = 1  # burst: bursts sent one after the other, each once the last one ended


async def send_one(
    stub: generation_pb2_grpc.GenerationServiceStub,
    request: generation_pb2.GenerateRequest,
    record: RequestRecord,
    timeout_s: float,
    metadata: Metadata = (),
) -> RequestRecord:
    """Streams one request into `record` (which holds its start time); `metadata` carries the
    bearer token when one is set."""
    final = None
    try:
        async for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
            if response.HasField("chunk"):
                record.chunk_times.append(time.perf_counter())
                record.chunk_tokens.append(len(response.chunk.token_ids))
            else:
                final = response.final
    except grpc.aio.AioRpcError as exc:
        record.status, record.error = exc.code().name, exc.details() or ""
    record.end = time.perf_counter()
    if record.ok and final is None:
        record.status, record.error = INCOMPLETE_STREAM, "the stream ended without a final message"
    if final is not None:
        record.finish_reason = metrics_pb2.FinishReason.Name(final.finish_reason)
        record.prompt_tokens, record.completion_tokens = final.prompt_tokens, final.completion_tokens
        record.metrics = final.metrics
    return record


async def run_load(
    stubs: Sequence[generation_pb2_grpc.GenerationServiceStub],
    make_request: RequestFactory,
    pacing: Pacing,
    timeout_s: float,
    metadata: Metadata = (),
) -> tuple[float, list[RequestRecord]]:
    """Sends the run's requests, client c's through stubs[c % len(stubs)]; returns (the run's
    start time, the records in sending order)."""
    if not stubs:
        raise ValueError("run_load needs at least one stub")
    records: list[RequestRecord] = []

    def start(
        client: int,
    ) -> tuple[generation_pb2_grpc.GenerationServiceStub, generation_pb2.GenerateRequest, RequestRecord]:
        index = len(records)
        request = make_request(index)
        record = RequestRecord(index=index, client=client, start=time.perf_counter())
        records.append(record)
        return stubs[client % len(stubs)], request, record

    run_start = time.perf_counter()
    if pacing.mode == "burst":
        for _ in range(pacing.rounds):
            started = [start(client) for client in range(int(pacing.level))]
            await asyncio.gather(
                *(send_one(stub, request, record, timeout_s, metadata) for stub, request, record in started)
            )
    elif pacing.mode == "sustained":
        deadline = None if pacing.duration_s is None else run_start + pacing.duration_s

        async def client_loop(client: int) -> None:
            sent = 0
            while (pacing.requests is None or sent < pacing.requests) and (
                deadline is None or time.perf_counter() < deadline
            ):
                await send_one(*start(client), timeout_s, metadata)
                sent += 1

        await asyncio.gather(*(client_loop(client) for client in range(int(pacing.level))))
    elif pacing.mode == "rate":
        arrivals = random.Random(pacing.arrival_seed)
        tasks = []
        due = run_start
        while pacing.requests is None or len(tasks) < pacing.requests:
            due += arrivals.expovariate(pacing.level)
            if pacing.duration_s is not None and due > run_start + pacing.duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send_one(*start(len(tasks)), timeout_s, metadata)))
        await asyncio.gather(*tasks)
    else:
        raise ValueError(f"unknown mode {pacing.mode!r}")
    return run_start, records
