"""TelemetryService ingest: parse, dedupe, validate, aggregate, acknowledge.

`Ingestor.process` is the synchronous core (one ReportRequest in, one ReportResponse out);
`TelemetryIngest` is the grpc.aio bidi-stream handler around it, which also pushes deferred
acknowledgements (ack mode "export": a record is acknowledged only after an OTLP export that
included it succeeded, see export.AckingPeriodicReader).

The stream is registered with a raw-bytes request deserializer so that a malformed batch is
counted (reason "malformed_batch") and answered with INVALID_ARGUMENT instead of disappearing
inside the gRPC framework. Nothing a client sends can raise out of the handler.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Hashable

import grpc
import structlog
from google.protobuf.message import DecodeError

from specdec.v1 import telemetry_pb2
from telemetry.aggregation import Aggregator, BatchSums, accumulate
from telemetry.dedupe import SourceTable
from telemetry.tracing import RequestSpans
from telemetry.validation import MAX_COUNT, check

log = structlog.get_logger(__name__)

SERVICE_NAME = "specdec.v1.TelemetryService"
REPORT_METHOD = f"/{SERVICE_NAME}/Report"

_ReportRequest = telemetry_pb2.ReportRequest
_ReportResponse = telemetry_pb2.ReportResponse


class MalformedBatch(Exception):
    pass


class RateLimitedLog:
    """At most `burst` lines per `period_s` per key; the rest are summarised."""

    def __init__(self, period_s: float = 10.0, burst: int = 5) -> None:
        self.period_s, self.burst = period_s, burst
        self._state: dict[str, list] = {}  # key -> [window_start, logged, suppressed]

    def allow(self, key: str) -> tuple[bool, int]:
        now = time.monotonic()
        st = self._state.get(key)
        if st is None or now - st[0] >= self.period_s:
            suppressed = st[2] if st else 0
            self._state[key] = [now, 1, 0]
            return True, suppressed
        if st[1] < self.burst:
            st[1] += 1
            return True, 0
        st[2] += 1
        return False, 0


class Ingestor:
    """Synchronous batch processing. Thread-safe through `lock` (the aggregation lock, also
    taken by the OTLP reader around collection)."""

    def __init__(self, aggregator: Aggregator, sources: SourceTable, lock: threading.Lock,
                 *, max_k: int, ack_after_export: bool, spans: RequestSpans | None = None
                 ) -> None:
        """spans: emits the span of a traced record (None: tracing off, traces ignored)."""
        self.spans = spans
        self.aggregator = aggregator
        self.sources = sources
        self.lock = lock
        self.max_k = max_k
        self.ack_after_export = ack_after_export
        self._rejection_log = RateLimitedLog()

    def snapshot(self) -> dict[str, int]:
        """Processed watermarks; the caller holds the lock."""
        return self.sources.processed_marks()

    def process_bytes(self, raw: bytes) -> tuple[telemetry_pb2.ReportResponse, str]:
        """Parse and process one serialized ReportRequest: (response, source_id)."""
        try:
            req = _ReportRequest.FromString(raw)
        except (DecodeError, TypeError, ValueError) as exc:
            self.aggregator.received.add(0)
            self.aggregator.count_rejected("malformed_batch")
            self._log_rejection("malformed_batch", "", 0, error=str(exc))
            raise MalformedBatch(str(exc)) from None
        return self.process(req), req.source_id

    def process(self, req: telemetry_pb2.ReportRequest) -> telemetry_pb2.ReportResponse:
        agg = self.aggregator
        records = req.records
        n = len(records)
        sid = req.source_id
        max_k = self.max_k
        spans = self.spans
        with self.lock:
            agg.received.add(n)
            if not sid:
                if n:
                    agg.count_rejected("missing_source_id", n)
                    self._log_rejection("missing_source_id", "", 0, records=n)
                return _ReportResponse(rejected=n)
            src = self.sources.get(sid)
            wm = src.processed
            batch: dict[Hashable, BatchSums] = {}
            ok = dup = rej = drops = 0
            reasons: dict[str, int] | None = None
            for rec in records:
                seq = rec.sequence
                if seq <= wm:
                    if seq:
                        dup += 1
                        continue
                    reason = "invalid_sequence"  # not deduplicable: its drops are not counted
                else:
                    wm = seq
                    try:
                        dropped_before = rec.dropped_before
                        if dropped_before > MAX_COUNT:  # garbage: neither it nor the record
                            reason = "count_out_of_range"
                        else:
                            # The drops before a record are counted when the record is new,
                            # whatever becomes of it (valid or rejected): they happened.
                            drops += dropped_before
                            if rec.HasField("metrics"):
                                m = rec.metrics
                                reason = check(m, max_k)
                                if reason is None:
                                    if spans is not None and rec.HasField("trace"):
                                        accumulate(batch, m, spans.emit(m, rec.trace))
                                    else:
                                        accumulate(batch, m)
                                    ok += 1
                                    continue
                            else:
                                reason = "missing_metrics"
                    except Exception:
                        log.exception("record processing failed", source_id=sid, sequence=seq)
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
                    log.exception("aggregation failed", source_id=sid)
                    agg.count_rejected("internal_error", ok)
            src.processed = wm
            if dup:
                agg.duplicates.add(dup)
            if reasons:
                for reason, count in reasons.items():
                    agg.count_rejected(reason, count)
            if drops:
                agg.service_dropped.add(drops)
            ack = src.durable if self.ack_after_export else wm
        return _ReportResponse(acknowledged_through_sequence=ack, accepted=ok, duplicates=dup,
                               rejected=rej)

    def _log_rejection(self, reason: str, source_id: str, sequence: int, **kw) -> None:
        allowed, suppressed = self._rejection_log.allow(reason)
        if allowed:
            log.warning("record rejected", reason=reason, source_id=source_id,
                        sequence=sequence, suppressed_since_last=suppressed, **kw)


def _request_id(rec: telemetry_pb2.MetricsRecord) -> str:
    try:
        return rec.metrics.request_id[:128]
    except Exception:
        return ""


class _Stream:
    __slots__ = ("queue", "sources", "peer")

    def __init__(self, peer: str) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sources: set[str] = set()
        self.peer = peer


_END = object()


class TelemetryIngest:
    """The grpc.aio handler for TelemetryService.Report. Lives on one event loop."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self._streams: dict[str, set[_Stream]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = True
        self.open_streams = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Report": grpc.stream_stream_rpc_method_handler(
                self.report,
                request_deserializer=None,  # raw bytes: we parse (and count failures) ourselves
                response_serializer=_ReportResponse.SerializeToString,
            ),
        })

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
        self.open_streams += 1
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
                await context.write(item)
        finally:
            self.open_streams -= 1
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
        try:
            async for raw in request_iterator:
                if not self.accepting:
                    break  # shutting down: what is not acknowledged will be resent
                try:
                    resp, sid = self.ingestor.process_bytes(raw)
                except MalformedBatch as exc:
                    stream.queue.put_nowait(exc)
                    return
                except Exception:
                    log.exception("batch processing failed")
                    continue
                # register for pushed acknowledgements once the source is known
                if self.ingestor.ack_after_export:
                    if sid and sid not in stream.sources:
                        stream.sources.add(sid)
                        self._streams.setdefault(sid, set()).add(stream)
                stream.queue.put_nowait(resp)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away, or the call was cancelled
            log.debug("report stream ended", peer=stream.peer, error=repr(exc))
        finally:
            stream.queue.put_nowait(_END)

