"""TelemetryService ingest: parse, dedupe, validate, aggregate, acknowledge.

`Ingestor.process` is the synchronous core (one ReportRequest in, one ReportResponse out),
`Ingestor.steps` the same in slices of SLICE_RECORDS records;
`TelemetryIngest` is the grpc.aio bidi-stream handler around it, which also pushes deferred
acknowledgements (ack mode "export": a record is acknowledged only after an OTLP export that
included it succeeded, see export.AckingPeriodicReader).

The stream is registered with a raw-bytes request deserializer so that a malformed batch is
counted (reason "malformed_batch") and answered with INVALID_ARGUMENT instead of disappearing
inside the gRPC framework (the refusal is logged once, by specdec_security.refusal_log).
Nothing a client sends can raise out of the handler. docs/security.md ("The ingest") lists
what a reporter that is let in can and cannot do to the aggregates.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator, Hashable

import grpc
import structlog
from google.protobuf.message import DecodeError

from specdec.v1 import telemetry_pb2
from specdec_common.proto_names import TELEMETRY_SERVICE
from specdec_security.log_limit import LogLimiter, clip
from telemetry.aggregation import Aggregator, BatchSums, accumulate
from telemetry.dedupe import DEFAULT_MAX_SEQUENCE_JUMP, SourceTable
from telemetry.series_budget import SeriesBudget
from telemetry.tracing import RequestSpans
from telemetry.validation import MAX_DROPPED_BEFORE, MAX_SOURCE_ID_LEN, check

log = structlog.get_logger(__name__)

SERVICE_NAME = TELEMETRY_SERVICE.full_name

_ReportRequest = telemetry_pb2.ReportRequest
_ReportResponse = telemetry_pb2.ReportResponse

# Records processed per lock hold; the stream handler yields to the event loop between
# slices, so one large batch (a 16 MiB message holds ~100k records) cannot hold up the
# other streams until it is done.
SLICE_RECORDS = 512
# Sources a stream is registered under for pushed acknowledgements (a reporter's stream
# carries one): bounds what one stream can make the sidecar remember.
MAX_SOURCES_PER_STREAM = 8
LOG_ID_CHARS = 64  # source and request ids in log lines
# Responses to batches a stream may have waiting to be written (see _Stream).
MAX_UNSENT_RESPONSES = 64


class MalformedBatch(Exception):
    pass


class Ingestor:
    """Synchronous batch processing. Thread-safe through `lock` (the aggregation lock, also
    taken by the OTLP reader around collection)."""

    def __init__(
        self,
        aggregator: Aggregator,
        sources: SourceTable,
        lock: threading.Lock,
        *,
        max_k: int,
        ack_after_export: bool,
        max_sequence_jump: int = DEFAULT_MAX_SEQUENCE_JUMP,
        series: SeriesBudget | None = None,
        log_limiter: LogLimiter | None = None,
        spans: RequestSpans | None = None,
    ) -> None:
        """spans: emits the span of a traced record (None: tracing off, traces ignored)."""
        self.spans = spans
        self.aggregator = aggregator
        self.sources = sources
        self.lock = lock
        self.max_k = max_k
        self.ack_after_export = ack_after_export
        self.max_sequence_jump = max_sequence_jump
        self.series = series if series is not None else SeriesBudget()
        self._log = log_limiter if log_limiter is not None else LogLimiter()
        # Set when the sidecar stops: a batch in progress ends at its next slice boundary, so
        # nothing is aggregated (and, in ack mode aggregate, acknowledged) after the final
        # export; the reporter resends the rest to the next incarnation.
        self.stopping = False

    def parse(self, raw: bytes) -> telemetry_pb2.ReportRequest:
        """A serialized ReportRequest; MalformedBatch (counted) when it does not parse."""
        try:
            return _ReportRequest.FromString(raw)
        except (DecodeError, TypeError, ValueError) as exc:
            # logged once, as the refused call (specdec_security.refusal_log)
            self.aggregator.count_rejected("malformed_batch")
            raise MalformedBatch(str(exc)) from None

    def process_bytes(self, raw: bytes) -> tuple[telemetry_pb2.ReportResponse, str]:
        """Parse and process one serialized ReportRequest: (response, source_id)."""
        req = self.parse(raw)
        return self.process(req), req.source_id

    def process(self, req: telemetry_pb2.ReportRequest) -> telemetry_pb2.ReportResponse:
        """Every slice of `req` at once."""
        steps = self.steps(req)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def steps(self, req: telemetry_pb2.ReportRequest) -> Generator[None, None, telemetry_pb2.ReportResponse]:
        """Process `req` SLICE_RECORDS records at a time, yielding between slices; returns the
        response. Each slice runs under the lock and leaves the source's watermark and the
        aggregates consistent with each other (an export between slices is exact)."""
        records = req.records
        n = len(records)
        sid = req.source_id
        if not sid or len(sid) > MAX_SOURCE_ID_LEN:
            reason = "missing_source_id" if not sid else "source_id_too_long"
            with self.lock:
                self.aggregator.received.add(n)
                if n:
                    self.aggregator.count_rejected(reason, n)
            if n:
                self._log_rejection(reason, sid, 0, records=n)
            return _ReportResponse(rejected=n)
        if not n:  # nothing to process: no table entry is made for it
            with self.lock:
                src = self.sources.peek(sid)
                ack = 0 if src is None else (src.durable if self.ack_after_export else src.processed)
            return _ReportResponse(acknowledged_through_sequence=ack)
        counts = [0, 0, 0]  # accepted, duplicates, rejected
        ack = 0
        for start in range(0, n, SLICE_RECORDS):
            if start:
                yield
                if self.stopping:
                    break
            ack = self._process_slice(sid, records, start, min(n, start + SLICE_RECORDS), counts)
        return _ReportResponse(
            acknowledged_through_sequence=ack, accepted=counts[0], duplicates=counts[1], rejected=counts[2]
        )

    def _process_slice(self, sid: str, records, start: int, stop: int, counts: list[int]) -> int:
        agg = self.aggregator
        max_k = self.max_k
        max_jump = self.max_sequence_jump
        admit = self.series.admit
        spans = self.spans
        with self.lock:
            agg.received.add(stop - start)
            # looked up per slice: another stream may have made the table forget it meanwhile
            src = self.sources.get(sid)
            wm = src.processed
            batch: dict[Hashable, BatchSums] = {}
            ok = dup = rej = drops = 0
            reasons: dict[str, int] | None = None
            for i in range(start, stop):
                rec = records[i]
                seq = rec.sequence
                if seq <= wm:
                    if seq:
                        dup += 1
                        continue
                    reason = "invalid_sequence"  # not deduplicable
                else:
                    try:
                        dropped_before = rec.dropped_before
                        # A known source's sequence advances by one plus the records it
                        # dropped in between (see dedupe.py); max_jump is the slack for
                        # records processed by another sidecar meanwhile. A record beyond it,
                        # or with an absurd drop count, does not move the watermark, so it
                        # cannot blank out the source's later records.
                        if dropped_before > MAX_DROPPED_BEFORE:
                            reason = "count_out_of_range"
                        elif wm and seq - wm - 1 - dropped_before > max_jump:
                            reason = "sequence_jump"
                        else:
                            wm = seq
                            if not rec.HasField("metrics"):
                                reason = "missing_metrics"
                            else:
                                m = rec.metrics
                                reason = check(m, max_k)
                                if reason is None:
                                    reason = admit(
                                        (m.target_model, m.method, m.draft_model, m.num_draft_tokens), src
                                    )
                                if reason is None:
                                    if spans is not None and rec.HasField("trace"):
                                        accumulate(batch, m, spans.emit(m, rec.trace))
                                    else:
                                        accumulate(batch, m)
                                    # drops ride on valid records only: a rejected record's
                                    # claim is not believed
                                    drops += dropped_before
                                    ok += 1
                                    continue
                    except Exception:
                        log.exception(
                            "record_processing_failed", source_id=clip(sid, LOG_ID_CHARS), sequence=seq
                        )
                        reason = "internal_error"
                rej += 1
                if reasons is None:
                    reasons = {}
                reasons[reason] = reasons.get(reason, 0) + 1
                self._log_rejection(reason, sid, seq, request_id=_request_id(rec))
            if batch:
                try:
                    agg.commit(batch)
                except Exception:  # a bug, not the client's fault: never crash the stream
                    log.exception("aggregation_failed", source_id=clip(sid, LOG_ID_CHARS))
                    agg.count_rejected("internal_error", ok)
                    rej, ok = rej + ok, 0  # the answer says what was counted
            src.processed = wm
            if dup:
                agg.duplicates.add(dup)
            if reasons:
                for reason, count in reasons.items():
                    agg.count_rejected(reason, count)
            if drops:
                agg.service_dropped.add(drops)
            counts[0] += ok
            counts[1] += dup
            counts[2] += rej
            return src.durable if self.ack_after_export else wm

    def _log_rejection(self, reason: str, source_id: str, sequence: int, **fields) -> None:
        self._log.log(
            log.warning,
            "record_rejected",
            reason,
            reason=reason,
            source_id=clip(source_id, LOG_ID_CHARS),
            sequence=sequence,
            **fields,
        )


def _request_id(rec: telemetry_pb2.MetricsRecord) -> str:
    try:
        return clip(rec.metrics.request_id, LOG_ID_CHARS)
    except Exception:
        return ""


class _Stream:
    __slots__ = ("queue", "credit", "sources", "peer")

    def __init__(self, peer: str) -> None:
        # Items: ReportResponse objects, a MalformedBatch, or _END. A batch's response takes
        # one credit, given back once it is written: a client that sends batches but never
        # reads the responses stops being read after MAX_UNSENT_RESPONSES of them, instead
        # of growing this queue without bound. (Pushed acknowledgements take none: at most
        # one per source per export.)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.credit = asyncio.Semaphore(MAX_UNSENT_RESPONSES)
        self.sources: set[str] = set()
        self.peer = peer


_END = object()


class _BatchResponse:
    """The answer to one batch (it holds one of its stream's credits until written)."""

    __slots__ = ("response",)

    def __init__(self, response: telemetry_pb2.ReportResponse) -> None:
        self.response = response


class TelemetryIngest:
    """The grpc.aio handler for TelemetryService.Report. Lives on one event loop."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self._streams: dict[str, set[_Stream]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: set[_Stream] = set()

    @property
    def accepting(self) -> bool:
        return not self.ingestor.stopping

    def stop_accepting(self) -> None:
        """No new batch is read and a batch in progress ends at its next slice boundary."""
        self.ingestor.stopping = True

    def queued_responses(self) -> int:
        """Responses waiting to be written, over every open stream (bounded by
        MAX_UNSENT_RESPONSES per stream, plus pushed acknowledgements)."""
        return sum(stream.queue.qsize() for stream in self._open)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Report": grpc.stream_stream_rpc_method_handler(
                    self.report,
                    request_deserializer=None,  # raw bytes: we parse (and count failures) ourselves
                    response_serializer=_ReportResponse.SerializeToString,
                ),
            },
        )

    # ---- acknowledgements after export (called from the exporter thread) ------------------
    def on_exported(self, marks: dict[str, int]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._apply_durable, marks)
            except RuntimeError:  # loop closed during shutdown
                pass

    def _apply_durable(self, marks: dict[str, int]) -> None:
        sources = self.ingestor.sources
        for sid, seq in marks.items():
            src = sources.peek(sid)
            if src is None or seq <= src.durable:
                continue
            src.durable = seq
            for stream in self._streams.get(sid, ()):
                stream.queue.put_nowait(_ReportResponse(acknowledged_through_sequence=seq))

    # ---- the stream ------------------------------------------------------------------------
    async def report(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        stream = _Stream(context.peer())
        self._open.add(stream)
        reader = asyncio.ensure_future(self._read(request_iterator, stream))
        abort_message = None
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    break
                if isinstance(item, MalformedBatch):
                    abort_message = f"malformed ReportRequest: {item}"
                    break
                if isinstance(item, _BatchResponse):
                    await context.write(item.response)
                    stream.credit.release()
                else:
                    await context.write(item)
        finally:
            self._open.discard(stream)
            reader.cancel()
            for sid in stream.sources:
                group = self._streams.get(sid)
                if group is not None:
                    group.discard(stream)
                    if not group:
                        del self._streams[sid]
        if abort_message is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, abort_message)

    async def _read(self, request_iterator, stream: _Stream) -> None:
        ingestor = self.ingestor
        try:
            async for raw in request_iterator:
                if not self.accepting:
                    break  # shutting down: what is not acknowledged will be resent
                await stream.credit.acquire()  # waits while the client reads no responses
                try:
                    req = ingestor.parse(raw)
                    steps = ingestor.steps(req)
                    while True:
                        try:
                            next(steps)
                        except StopIteration as done:
                            resp = done.value
                            break
                        await asyncio.sleep(0)  # let the other streams in between slices
                except MalformedBatch as exc:
                    stream.queue.put_nowait(exc)
                    return
                except Exception:
                    log.exception("batch_processing_failed")
                    stream.credit.release()
                    continue
                sid = req.source_id
                # register for pushed acknowledgements once the source is known
                if (
                    ingestor.ack_after_export
                    and sid
                    and sid not in stream.sources
                    and len(stream.sources) < MAX_SOURCES_PER_STREAM
                    and ingestor.sources.peek(sid) is not None
                ):
                    stream.sources.add(sid)
                    self._streams.setdefault(sid, set()).add(stream)
                stream.queue.put_nowait(_BatchResponse(resp))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away, or the call was cancelled
            log.debug("report_stream_ended", peer=stream.peer, error=repr(exc))
        finally:
            stream.queue.put_nowait(_END)
