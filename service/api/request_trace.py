"""The request's trace context: captured by the service, turned into a span by the sidecar.

The service produces no spans and runs no tracing SDK (docs/tracing.md says why). With
`--tracing` on, the Generate handler, on the event loop, calls `capture()`: it reads the W3C
trace context (`traceparent`, `tracestate`) from the call's metadata with OpenTelemetry's
propagator, keeps the caller's trace when it is valid or starts a new trace id, picks the
id of the request's span, and serializes a `RequestTrace` (telemetry.proto). Those bytes ride
on the request's metrics record to the sidecar, which emits the span. The thread delivering
the engine's events only hands the bytes on with the record; the engine never sees them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from specdec.v1 import generation_pb2, telemetry_pb2

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# W3C trace context: a tracestate may be cut at 512 characters; a longer one is dropped
# whole here (the sidecar rejects longer ones too), never cut inside an entry.
MAX_TRACE_STATE_CHARS = 512
OPERATION_CHAT = "chat"
OPERATION_TEXT_COMPLETION = "text_completion"

_PROPAGATOR = TraceContextTextMapPropagator()
_IDS = RandomIdGenerator()


@dataclass(frozen=True, slots=True)
class CapturedTrace:
    """One request's trace context: ids as lowercase hex (for the log line) and the
    serialized RequestTrace that travels with its metrics record."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" when the request started its trace
    encoded: bytes


def _carrier(metadata: Iterable[tuple[str, object]] | None) -> dict[str, str]:
    """traceparent and tracestate from gRPC metadata. A repeated traceparent is ambiguous
    and ignored (a new trace starts); repeated tracestate headers are one list (W3C)."""
    parents: list[str] = []
    states: list[str] = []
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == TRACEPARENT:
            parents.append(value)
        elif key == TRACESTATE:
            states.append(value)
    carrier = {}
    if len(parents) == 1:
        carrier[TRACEPARENT] = parents[0]
        if states:
            carrier[TRACESTATE] = ",".join(states)
    return carrier


def capture(
    metadata: Iterable[tuple[str, object]] | None, request: generation_pb2.GenerateRequest
) -> CapturedTrace:
    """The request's trace context, from the call's metadata (an invalid traceparent is
    ignored: the request starts a trace of its own)."""
    carrier = _carrier(metadata)
    parent = get_current_span(_PROPAGATOR.extract(carrier)).get_span_context() if carrier else None
    trace = telemetry_pb2.RequestTrace(
        operation_name=OPERATION_CHAT if request.HasField("messages") else OPERATION_TEXT_COMPLETION
    )
    if parent is not None and parent.is_valid:
        trace_id = parent.trace_id
        trace.parent_span_id = parent.span_id.to_bytes(8, "big")
        trace.trace_flags = int(parent.trace_flags)
        state = parent.trace_state.to_header()
        if len(state) <= MAX_TRACE_STATE_CHARS:
            trace.trace_state = state
    else:
        trace_id = _IDS.generate_trace_id()
    span_id = _IDS.generate_span_id()
    trace.trace_id = trace_id.to_bytes(16, "big")
    trace.span_id = span_id.to_bytes(8, "big")
    if request.HasField("max_tokens"):
        trace.max_tokens = request.max_tokens
    sampling = request.sampling
    for name in ("temperature", "top_p", "top_k", "seed"):
        if sampling.HasField(name):
            setattr(trace, name, getattr(sampling, name))
    return CapturedTrace(
        trace_id=f"{trace_id:032x}",
        span_id=f"{span_id:016x}",
        parent_span_id=trace.parent_span_id.hex(),
        encoded=trace.SerializeToString(),
    )
