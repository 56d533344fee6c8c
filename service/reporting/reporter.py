"""MetricsReporter: streams SpeculativeMetrics to the telemetry sidecar without ever blocking.

    reporter = MetricsReporter("127.0.0.1:50052", instance_id="svc-1")
    reporter.start()
    reporter.report(metrics)        # any thread; O(1); never blocks on the network
    ...
    reporter.stop(timeout_s=10)     # flush (wait for acknowledgements), then close

Records get per-source sequence numbers (1, 2, 3, ...; source_id = instance id + a per-process
nonce) and sit in a bounded buffer until the sidecar acknowledges them
(`acknowledged_through_sequence`). A background thread keeps one long-lived bidi stream
`TelemetryService.Report` open, sends batches (up to `batch_size` records and `max_batch_bytes`
of them, or whatever is buffered after `linger_s`), and on any stream failure reconnects with
exponential backoff and full jitter, then resends, in order, every record that was not
acknowledged.

Buffer: at most `buffer_size` records (sent-but-unacknowledged plus never-sent). When full, the
oldest *never-sent* record is dropped and counted; records that were sent but not yet
acknowledged are kept (the sidecar may hold them, and only they can be resent after a sidecar
restart). If everything buffered is in flight, the new record itself is the one dropped.
Dropped records leave gaps in the sequence, and their count travels with the records: each
record carries `dropped_before`, the number of records dropped immediately before it (since
the previous record kept). Dropping the oldest unsent record r adds r's dropped_before + 1 to
the next kept unsent record, or, when none is left, to a carry that the next record reported
takes. The sidecar counts dropped_before once per record it processes as new, so drops are
counted exactly once, with the same guarantees as the records themselves (a drop count is lost
only with its record, e.g. records still buffered when the service stops). Drops are also
logged (at most once per `drop_log_interval_s`). A record larger than `max_batch_bytes` is
dropped when reported, the same way: no batch could carry it, and a batch the sidecar refuses
as too large would be resent, and refused, forever, holding back every record after it.

Security: TLS comes with `channel_credentials`; `call_metadata` (the bearer token) is called
for every new stream, so a rotated token file takes effect at the next reconnect.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog

from specdec.v1 import metrics_pb2, telemetry_pb2
from specdec_common.proto_names import REPORT_METHOD
from specdec_security.tokens import SecuritySetupError

log = structlog.get_logger(__name__)


_CHANNEL_OPTIONS = [
    # our own backoff drives reconnects; keep the channel's from lagging behind it
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ReporterStats:
    """A snapshot. sent counts records written to a stream (resends included); acked counts
    records acknowledged; dropped counts records dropped from the full buffer; pending is the
    number buffered (in flight or not yet sent); reconnects counts streams that failed."""

    sent: int
    acked: int
    dropped: int
    reconnects: int
    pending: int
    in_flight: int
    acknowledged_through: int
    last_sequence: int
    connected: bool


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# (sequence, serialized SpeculativeMetrics, dropped_before, serialized RequestTrace or b"")
Record = tuple[int, bytes, int, bytes]


def encode_report_request(source_id: bytes, records: list[Record]) -> bytes:
    """Serialize a ReportRequest from already-serialized SpeculativeMetrics, without
    re-parsing them: field 1 source_id, field 2 MetricsRecord{1: sequence, 2: metrics,
    3: dropped_before (omitted when 0), 4: trace (omitted when empty)}. (Parses to the same
    message as building it with the generated class; tests/telemetry/test_reporter.py checks.)"""
    parts = [b"\x0a", _varint(len(source_id)), source_id]
    for seq, data, dropped_before, trace in records:
        body = b"\x08" + _varint(seq) + b"\x12" + _varint(len(data)) + data
        if dropped_before:
            body += b"\x18" + _varint(dropped_before)
        if trace:
            body += b"\x22" + _varint(len(trace)) + trace
        parts.append(b"\x12")
        parts.append(_varint(len(body)))
        parts.append(body)
    return b"".join(parts)


class _StreamState:
    __slots__ = ("resend", "dead", "received_ack")

    def __init__(self, resend: list[Record]) -> None:
        self.resend = deque(resend)  # in-flight records to send again on this stream, in order
        self.dead = False
        self.received_ack = False


class MetricsReporter:
    """Thread-safe: `report` may be called from any thread, concurrently. `start`, `flush`,
    `stop` are meant for the owner (the service), typically from one thread."""

    def __init__(
        self,
        target: str,
        *,
        instance_id: str,
        buffer_size: int = 10000,
        batch_size: int = 256,
        max_batch_bytes: int = 4 << 20,
        linger_s: float = 0.05,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        drop_log_interval_s: float = 10.0,
        channel_credentials: grpc.ChannelCredentials | None = None,
        channel_options: list[tuple[str, object]] | None = None,
        call_metadata: Callable[[], Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        if buffer_size < 1 or batch_size < 1 or max_batch_bytes < 1:
            raise ValueError("buffer_size, batch_size and max_batch_bytes must be >= 1")
        self.target = target
        self.instance_id = instance_id
        self.source_id = f"{instance_id}/{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._source_bytes = self.source_id.encode()
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        # The sidecar refuses messages over 16 MiB (telemetry/server.py); a batch stays well under.
        self.max_batch_bytes = max_batch_bytes
        self.linger_s = linger_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.drop_log_interval_s = drop_log_interval_s
        self._credentials = channel_credentials
        # called for every new stream, so a rotated token file is picked up on reconnect
        self._call_metadata = call_metadata
        self._channel_options = list(_CHANNEL_OPTIONS) + list(channel_options or [])

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # sender/flush waits; report notifies
        self._seq = itertools.count(1)
        self._last_seq = 0
        # records are (sequence, data, dropped_before); only never-sent ones change
        self._pending: deque[Record] = deque()  # never sent
        self._in_flight: deque[Record] = deque()  # sent, not acknowledged
        self._carry_drops = 0  # drops that go on the next record reported (nothing unsent)
        self._acked_through = 0
        self._oldest_pending_t = 0.0
        self._sender_waiting = False
        self._flush_requested = 0
        self._sent = 0
        self._acked = 0
        self._dropped = 0
        self._oversized = 0  # of the dropped: records larger than max_batch_bytes
        self._reconnects = 0
        self._connected = False
        self._stream: _StreamState | None = None
        self._call = None
        self._stopping = False
        self._closed = threading.Event()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._dropped_logged = 0
        self._drop_logged_at = 0.0

    # ---- the caller's side ----------------------------------------------------------------
    def report(self, metrics: metrics_pb2.SpeculativeMetrics, trace: bytes = b"") -> None:
        """Buffer one record; never blocks on I/O. Safe from any thread. Works before
        start() (records wait in the buffer) and is a no-op after stop(). `trace`: the
        request's serialized RequestTrace (service/api/request_trace.py), b"" when not traced."""
        data = metrics.SerializeToString()
        with self._lock:
            if self._stopping:
                return
            if len(data) + len(trace) > self.max_batch_bytes:  # no batch can carry it: dropped, and counted
                self._dropped += 1
                self._oversized += 1  # logged by the sender thread, with the other drops
                self._carry_drops += 1  # on the next record reported, the one after this
                return
            seq = next(self._seq)
            self._last_seq = seq
            pending = self._pending
            if not pending:
                self._oldest_pending_t = time.monotonic()
            pending.append((seq, data, self._carry_drops, trace))
            self._carry_drops = 0
            if len(pending) + len(self._in_flight) > self.buffer_size:
                # drop the oldest never-sent record (possibly this one); its drop count and
                # itself go on the next kept unsent record, else on the next one reported
                carried = pending.popleft()[2] + 1
                self._dropped += 1
                if pending:
                    nseq, ndata, ndrops, ntrace = pending[0]
                    pending[0] = (nseq, ndata, ndrops + carried, ntrace)
                else:
                    self._carry_drops = carried
            if self._sender_waiting and len(pending) >= self.batch_size:
                self._cond.notify_all()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything reported so far has been acknowledged. True on success."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._last_seq
            self._flush_requested += 1
            self._cond.notify_all()
            try:
                while True:
                    if self._acked_through >= target or (
                        (not self._in_flight or self._in_flight[0][0] > target)
                        and (not self._pending or self._pending[0][0] > target)
                    ):
                        return True  # acknowledged (or dropped from a full buffer)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed.is_set():
                        return False
                    self._cond.wait(min(remaining, 0.1))
            finally:
                self._flush_requested -= 1

    @property
    def stats(self) -> ReporterStats:
        with self._lock:
            return ReporterStats(
                sent=self._sent,
                acked=self._acked,
                dropped=self._dropped,
                reconnects=self._reconnects,
                pending=len(self._pending) + len(self._in_flight),
                in_flight=len(self._in_flight),
                acknowledged_through=self._acked_through,
                last_sequence=self._last_seq,
                connected=self._connected,
            )

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> MetricsReporter:
        if self._thread is not None:
            return self
        if self._credentials is not None:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=self._channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=self._channel_options)
        self._report = self._channel.stream_stream(
            REPORT_METHOD,
            request_serializer=None,  # we send pre-serialized ReportRequest bytes
            response_deserializer=telemetry_pb2.ReportResponse.FromString,
        )
        self._thread = threading.Thread(target=self._run, name="metrics-reporter", daemon=True)
        self._thread.start()
        log.info(
            "metrics_reporter_started",
            target=self.target,
            source_id=self.source_id,
            buffer_size=self.buffer_size,
            batch_size=self.batch_size,
        )
        return self

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Flush for up to `timeout_s`, then close the stream and the thread. Returns whether
        everything was acknowledged. Records still buffered are lost (and logged)."""
        flushed = self.flush(timeout_s) if self._thread is not None else False
        with self._cond:
            self._stopping = True
            if self._stream is not None:
                self._stream.dead = True
            self._cond.notify_all()
            call = self._call
        self._stop_event.set()
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._channel is not None:
            self._channel.close()
        self._closed.set()
        st = self.stats
        log.info(
            "metrics_reporter_stopped",
            flushed=flushed,
            sent=st.sent,
            acked=st.acked,
            dropped=st.dropped,
            unacknowledged=st.pending,
            reconnects=st.reconnects,
        )
        return flushed

    # ---- the sender thread -------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                if self._stopping:
                    return
                # everything in flight goes again, in order, on the new stream
                stream = _StreamState(list(self._in_flight))
                self._stream = stream
            error = None
            try:
                metadata = tuple(self._call_metadata()) if self._call_metadata else None
                call = self._report(self._requests(stream), wait_for_ready=False, metadata=metadata)
                with self._cond:
                    self._call = call
                    if self._stopping:
                        call.cancel()
                for resp in call:
                    self._on_ack(stream, resp.acknowledged_through_sequence)
                error = "stream closed by the sidecar"
            except SecuritySetupError as exc:  # the token file went missing or bad: retried
                error = str(exc)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                error = f"{code}: {exc.details() if hasattr(exc, 'details') else exc}"
            except Exception as exc:  # a bug here must not kill reporting for good
                error = repr(exc)
                log.exception("metrics_reporter_stream_failed")
            with self._cond:
                stream.dead = True
                self._connected = False
                self._call = None
                self._cond.notify_all()
                if self._stopping:
                    return
                self._reconnects += 1
                if stream.received_ack:
                    attempt = 0
            delay = min(self.backoff_max_s, self.backoff_initial_s * (2**attempt))
            delay *= random.uniform(0.5, 1.0)  # jitter: reporters do not reconnect in lockstep
            attempt = min(attempt + 1, 30)
            log.info(
                "telemetry_stream_down_reconnecting",
                target=self.target,
                error=error,
                retry_in_s=round(delay, 3),
                unacknowledged=self.stats.pending,
            )
            if self._stop_event.wait(delay):
                return
            with self._lock:
                dropped = self._dropped
            self._maybe_log_drops(dropped)

    def _on_ack(self, stream: _StreamState, through: int) -> None:
        with self._cond:
            stream.received_ack = True
            self._connected = True
            if through <= self._acked_through:
                return
            self._acked_through = through
            in_flight = self._in_flight
            n = 0
            while in_flight and in_flight[0][0] <= through:
                in_flight.popleft()
                n += 1
            self._acked += n
            self._cond.notify_all()

    def _requests(self, stream: _StreamState):
        """Runs in gRPC's request-consumer thread: yields serialized batches."""
        while True:
            with self._cond:
                batch = self._next_batch(stream)
                if batch is None:
                    return
                dropped = self._dropped
                self._sent += len(batch)
            self._maybe_log_drops(dropped)
            yield encode_report_request(self._source_bytes, batch)

    def _next_batch(self, stream: _StreamState) -> list[Record] | None:
        """Called with the lock held; waits for something to send. None ends the stream."""
        while True:
            if stream.dead or self._stopping:
                return None
            resend = stream.resend
            while resend and resend[0][0] <= self._acked_through:
                resend.popleft()
            if resend:
                return self._take(resend)
            pending = self._pending
            if pending:
                waited = time.monotonic() - self._oldest_pending_t
                if len(pending) >= self.batch_size or waited >= self.linger_s or self._flush_requested:
                    batch = self._take(pending)
                    self._in_flight.extend(batch)
                    if pending:
                        self._oldest_pending_t = time.monotonic()
                    return batch
                timeout = self.linger_s - waited
            else:
                timeout = 1.0
            self._sender_waiting = True
            try:
                self._cond.wait(timeout)
            finally:
                self._sender_waiting = False

    def _take(self, records: deque[Record]) -> list[Record]:
        """The next batch from the front of `records`: at most batch_size records and
        max_batch_bytes of metrics (at least one record; report() keeps larger ones out)."""
        batch = [records.popleft()]
        size = len(batch[0][1]) + len(batch[0][3])
        while records and len(batch) < self.batch_size:
            size += len(records[0][1]) + len(records[0][3])
            if size > self.max_batch_bytes:
                break
            batch.append(records.popleft())
        return batch

    def _maybe_log_drops(self, dropped: int) -> None:
        if dropped <= self._dropped_logged:
            return
        now = time.monotonic()
        if now - self._drop_logged_at < self.drop_log_interval_s and self._dropped_logged:
            return
        log.warning(
            "metrics_reporter_dropped_records",
            note="the oldest unsent of a full buffer, or records larger than max_batch_bytes",
            dropped_total=dropped,
            dropped_since_last_log=dropped - self._dropped_logged,
            too_large_total=self._oversized,
            buffer_size=self.buffer_size,
            max_batch_bytes=self.max_batch_bytes,
        )
        self._dropped_logged = dropped
        self._drop_logged_at = now
