"""GenerationService over grpc.aio: streams engine events to the client.

The engine runs on its own thread (in this process, or in the engine process, whose events a
reader thread here delivers); its callbacks hop onto the event loop with
call_soon_threadsafe, so nothing here blocks the loop on model work. Prompts are tokenized
in a small thread pool, except a small request (request_mapping.maps_inline) that arrives
while no other call is streaming: it costs about what the hop to the pool and back does and
is mapped on the loop. A client that cancels or passes its deadline cancels its handler task,
whose `finally` cancels the engine request (the slot is freed within one pass).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from service import __version__
from service.api.request_mapping import (
    RequestLimits,
    check_request_id,
    maps_inline,
    to_chunk,
    to_engine_request,
)
from service.api.request_trace import CapturedTrace, capture
from service.api.streaming import take_ready
from service.engine.api import (
    EngineLost,
    EngineStoppedError,
    Event,
    FinalResult,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
)
from specdec.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger(__name__)


class ServingState(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"


OnFinal = Callable[[FinalResult, "CapturedTrace | None"], None]


class LoopInbox:
    """Events from the delivering thread onto the event loop, one wake-up per burst.

    The engine delivers a pass's events for every running request in a row; a
    call_soon_threadsafe per event would write the loop's wake-up pipe once per request and
    pass (on the engine thread, in the thread mode). Here the first event of a burst schedules
    one drain and the others join it; each queue still gets its events in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Event], event: Event) -> None:  # any thread
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _drain(self) -> None:  # on the loop
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


class _EventBridge:
    """Engine callback -> asyncio.Queue on the handler's loop."""

    def __init__(self, inbox: LoopInbox, on_final: OnFinal, trace: CapturedTrace | None = None):
        self._inbox = inbox
        self._on_final = on_final
        self._trace = trace
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:  # the engine thread, or the engine process's reader
        if isinstance(event, FinalResult):
            # Report and log even when the client has gone: the work was done.
            self._on_final(event, self._trace)
        self._inbox.put(self.queue, event)


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        limits: RequestLimits,
        on_final: OnFinal,
        tokenize_workers: int = 2,
        tracing: bool = False,
    ) -> None:
        """on_final(result, trace) runs on the thread delivering events (the engine's, or the
        engine process's reader) for every finished request;
        trace is the request's captured trace context, None unless `tracing` is on;
        a small request (maps_inline) while no other call streams is mapped and tokenized on
        the event loop, the others on a pool of `tokenize_workers` threads."""
        self._limits = limits
        self._on_final = on_final
        self._tracing = tracing
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=tokenize_workers, thread_name_prefix="tokenize"
        )
        self.state = ServingState.LOADING
        self.engine: Any = None  # service.engine.Engine once loaded
        self.tokenizer: Any = None
        self.server_info = generation_pb2.GetServerInfoResponse(version=__version__)
        self._inbox: LoopInbox | None = None  # of the loop serving the calls
        self._streaming = 0  # submitted calls whose stream has not ended (on the loop)

    def attach(self, engine: Any, tokenizer: Any, server_info: generation_pb2.GetServerInfoResponse) -> None:
        self.engine, self.tokenizer, self.server_info = engine, tokenizer, server_info
        self.state = ServingState.SERVING

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def GetServerInfo(self, request, context):  # noqa: N802 (gRPC method name)
        if self.state is ServingState.LOADING:  # the models, and so most fields, are not known yet
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is loading its models; retry later")
        return self.server_info

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        received_at = time.monotonic()  # the request's timings start here, before tokenization
        try:
            check_request_id(request.request_id)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = request.request_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        trace = None
        if self._tracing:
            trace = capture(context.invocation_metadata(), request)
            structlog.contextvars.bind_contextvars(trace_id=trace.trace_id, span_id=trace.span_id)
        if self.state is not ServingState.SERVING:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"server is {self.state.value}; retry later (request_id={request_id})",
            )
        loop = asyncio.get_running_loop()
        try:
            if self._streaming == 0 and maps_inline(request):
                # A small request while no other is streaming: on the loop, where it costs what
                # the hop to the pool and back would. Otherwise the pool maps it, so that the
                # loop goes on streaming the others' tokens and reading new calls, and several
                # prompts are tokenized at once (the tokenizer releases the GIL).
                engine_request: GenerationRequest = to_engine_request(
                    request, request_id, self.tokenizer, self._limits, received_at
                )
            else:
                engine_request = await loop.run_in_executor(
                    self._tokenize_pool,
                    to_engine_request,
                    request,
                    request_id,
                    self.tokenizer,
                    self._limits,
                    received_at,
                )
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc} (request_id={request_id})")

        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = LoopInbox(loop)
        bridge = _EventBridge(self._inbox, self._on_final, trace)
        try:
            handle = self.engine.submit(engine_request, bridge)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc} (request_id={request_id})")
        except QueueFullError as exc:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later (request_id={request_id})"
            )
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc} (request_id={request_id})")

        finished = False
        self._streaming += 1
        try:
            while True:
                chunk, event = take_ready(await bridge.queue.get(), bridge.queue)
                if chunk is not None:
                    yield generation_pb2.GenerateResponse(request_id=request_id, chunk=to_chunk(chunk))
                if event is None:
                    continue
                finished = True
                if isinstance(event, EngineLost):
                    # The engine went away (its process exited): nothing failed in this
                    # request, and another replica can serve it.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"request {request_id} was lost: {event.reason}"
                    )
                if event.finish_reason is FinishReason.ERROR:
                    # An unexpected failure of this request alone; the engine keeps serving.
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"request {request_id} failed: {event.error}"
                    )
                if event.finish_reason is FinishReason.CANCELLED:
                    # Only the server cancels a request whose client is still there: the
                    # drain grace period ran out. Retryable elsewhere.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"server shut down before request {request_id} finished"
                    )
                yield generation_pb2.GenerateResponse(
                    request_id=request_id,
                    final=generation_pb2.GenerateFinal(
                        finish_reason=event.finish_reason.value,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        metrics=event.metrics,
                    ),
                )
                return
        finally:
            self._streaming -= 1
            if not finished:  # client cancelled, deadline passed, or the stream broke
                handle.cancel()
