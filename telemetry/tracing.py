"""Request spans: one span per traced request, emitted by the sidecar (docs/tracing.md).

A record whose service traced the request carries a `RequestTrace` (telemetry.proto): the
trace id, the span id the service chose, the caller's span (from an incoming W3C
traceparent) and a few request parameters. `RequestSpans.emit` turns it and the record's
SpeculativeMetrics into a span with the OpenTelemetry tracing SDK, with the request's real
start and end (the record's `end_time` minus its `duration_seconds`), the GenAI semantic
conventions' attributes and the speculative metrics as `specdec.*` attributes, and returns
the span's context, in which the aggregator records the record's histogram values so that
their exemplars carry its trace and span id.

Span ids: the SDK draws ids from its IdGenerator; `_ServiceIds` hands it the ids the service
chose, so the span is the one the service's log line names, and a record resent after a
sidecar restart makes a span with the same ids. Sampling is the SDK's (OTEL_TRACES_SAMPLER,
default parentbased_always_on): a caller's unsampled traceparent yields no span and no
exemplar. Export: a BatchSpanProcessor (OTEL_BSP_* variables) to the OTLP span exporter
(OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _PROTOCOL, _HEADERS, ...), read by the SDK.

Resource: the span describes work of the inference service, so its resource is the service's
(`service.name` from --span-service-name, `service.instance.id` from the record's
instance_id, plus OTEL_RESOURCE_ATTRIBUTES), one TracerProvider per reporting instance
(at most MAX_INSTANCES, least recently used dropped), all feeding one span processor.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
    set_span_in_context,
)

from specdec.v1 import metrics_pb2, telemetry_pb2
from specdec_common.proto_names import FINISH_REASON_NAMES, METHOD_NAMES
from telemetry.aggregation import (
    ATTR_DRAFT_MODEL,
    ATTR_K,
    ATTR_METHOD,
    ATTR_REQUEST_ID,
)
from telemetry.validation import MAX_IDENTITY_LEN, check_trace

log = structlog.get_logger(__name__)

SCOPE = "specdec.telemetry"
DEFAULT_SPAN_SERVICE_NAME = "specdec"
MAX_INSTANCES = 1024


def build_otlp_span_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:  # config.py validates
        raise ValueError(f"unsupported OTLP protocol {protocol!r}")
    return OTLPSpanExporter()


class _ServiceIds(IdGenerator):
    """Gives the SDK the ids the service chose for the span being started."""

    def __init__(self) -> None:
        self._next = threading.local()

    def use(self, trace_id: int, span_id: int) -> None:
        self._next.trace_id, self._next.span_id = trace_id, span_id

    def generate_trace_id(self) -> int:  # only for a root span: the trace the service started
        return self._next.trace_id

    def generate_span_id(self) -> int:
        return self._next.span_id


class _InvalidTraceState(ValueError):
    """The record's tracestate is not a W3C list-member list."""


def _nanos(seconds: float) -> int:
    return int(round(seconds * 1e9))


def span_attributes(m: metrics_pb2.SpeculativeMetrics, t: telemetry_pb2.RequestTrace) -> dict:
    """GenAI semantic-convention attributes, then the request's speculative metrics."""
    a: dict = {
        "gen_ai.operation.name": t.operation_name,
        "gen_ai.request.model": m.target_model,
        "gen_ai.response.model": m.target_model,
        "gen_ai.response.id": m.request_id,
        "gen_ai.response.finish_reasons": (FINISH_REASON_NAMES[m.finish_reason],),
        "gen_ai.usage.input_tokens": m.prompt_tokens,
        "gen_ai.usage.output_tokens": m.completion_tokens,
        "gen_ai.request.stream": True,
    }
    for field, name in (
        ("max_tokens", "gen_ai.request.max_tokens"),
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
        ("top_k", "gen_ai.request.top_k"),
        ("seed", "gen_ai.request.seed"),
    ):
        if t.HasField(field):
            a[name] = getattr(t, field)
    if m.HasField("time_to_first_token_seconds"):
        a["gen_ai.response.time_to_first_chunk"] = m.time_to_first_token_seconds
    if m.finish_reason == metrics_pb2.FINISH_REASON_ERROR:
        a["error.type"] = "_OTHER"
    a[ATTR_REQUEST_ID] = m.request_id
    a[ATTR_METHOD] = METHOD_NAMES[m.method]
    a[ATTR_DRAFT_MODEL] = m.draft_model
    a[ATTR_K] = m.num_draft_tokens
    a["specdec.finish_reason"] = FINISH_REASON_NAMES[m.finish_reason]
    a["specdec.verify_passes"] = m.verify_passes
    a["specdec.draft_passes"] = m.draft_passes
    a["specdec.proposed_drafts"] = m.proposed_drafts
    a["specdec.accepted_drafts"] = m.accepted_drafts
    if m.HasField("accept_rate"):
        a["specdec.accept_rate"] = m.accept_rate
    if m.HasField("accept_length"):
        a["specdec.accept_length"] = m.accept_length
    a["specdec.accept_histogram"] = tuple(m.accept_histogram)
    a["specdec.proposed_per_position"] = tuple(m.proposed_per_position)
    a["specdec.accepted_per_position"] = tuple(m.accepted_per_position)
    a["specdec.queue_time_seconds"] = m.queue_time_seconds
    return a


class RequestSpans:
    """Emits the span of each traced record; `emit` is called under the aggregation lock."""

    def __init__(
        self, *, exporter: SpanExporter, span_service_name: str, on_ignored: Callable[[str], None]
    ) -> None:
        self._processor = SynchronousMultiSpanProcessor()
        self._processor.add_span_processor(BatchSpanProcessor(exporter))
        self._ids = _ServiceIds()
        # OTEL_SERVICE_NAME describes the sidecar; the spans' service is span_service_name.
        self._base_resource = Resource.create().merge(Resource({SERVICE_NAME: span_service_name}))
        self._limits = SpanLimits(max_attribute_length=MAX_IDENTITY_LEN)
        self._tracers: OrderedDict[str, Tracer] = OrderedDict()
        self._on_ignored = on_ignored

    def _tracer(self, instance_id: str) -> Tracer:
        tracer = self._tracers.get(instance_id)
        if tracer is not None:
            self._tracers.move_to_end(instance_id)
            return tracer
        provider = TracerProvider(
            resource=self._base_resource.merge(Resource({SERVICE_INSTANCE_ID: instance_id})),
            shutdown_on_exit=False,
            active_span_processor=self._processor,
            id_generator=self._ids,
            span_limits=self._limits,
        )
        tracer = self._tracers[instance_id] = provider.get_tracer(SCOPE)
        if len(self._tracers) > MAX_INSTANCES:
            self._tracers.popitem(last=False)
        return tracer

    def emit(self, m: metrics_pb2.SpeculativeMetrics, t: telemetry_pb2.RequestTrace) -> Context | None:
        """Emit the span of valid record `m`; returns the context to record its measurements
        in, or None when the sampler dropped the span or the trace context is malformed
        (ignored and counted)."""
        reason = check_trace(t, m)
        if reason is None:
            try:
                return self._emit(m, t)
            except _InvalidTraceState:
                reason = "trace_state_invalid"
            except Exception:  # a bug here must cost the span, never the record
                log.exception("span_emission_failed", request_id=m.request_id)
                reason = "internal_error"
        self._on_ignored(reason)
        return None

    def _emit(self, m: metrics_pb2.SpeculativeMetrics, t: telemetry_pb2.RequestTrace) -> Context | None:
        trace_id = int.from_bytes(t.trace_id, "big")
        if t.parent_span_id:
            state = TraceState()
            if t.trace_state:
                state = TraceState.from_header([t.trace_state])
                if not len(state) and t.trace_state.strip(" \t,"):
                    raise _InvalidTraceState(t.trace_state)
            parent = SpanContext(
                trace_id,
                int.from_bytes(t.parent_span_id, "big"),
                is_remote=True,
                trace_flags=TraceFlags(t.trace_flags),
                trace_state=state,
            )
            context = set_span_in_context(NonRecordingSpan(parent), Context())
        else:
            context = Context()  # a root span: never the ambient context
        end_ns = m.end_time.ToNanoseconds() if m.HasField("end_time") else time.time_ns()
        start_ns = end_ns - _nanos(m.duration_seconds)
        self._ids.use(trace_id, int.from_bytes(t.span_id, "big"))
        # The SDK's samplers decide on the trace id and the parent; the attributes are only
        # built for a span that records.
        span = self._tracer(m.instance_id).start_span(
            f"{t.operation_name} {m.target_model}", context=context, kind=SpanKind.SERVER, start_time=start_ns
        )
        if not span.is_recording():
            return None  # not sampled: no span, and no exemplar (the bulk path takes the values)
        span.set_attributes(span_attributes(m, t))
        span.add_event("admitted", timestamp=start_ns + _nanos(m.queue_time_seconds))
        if m.HasField("time_to_first_token_seconds"):
            span.add_event("first_token", timestamp=start_ns + _nanos(m.time_to_first_token_seconds))
        if m.finish_reason == metrics_pb2.FINISH_REASON_ERROR:
            span.set_status(Status(StatusCode.ERROR, "the request failed on the server"))
        span.end(end_time=end_ns)
        return set_span_in_context(span, Context())

    def shutdown(self, timeout_ms: float = 5000) -> None:
        """Export what is buffered, then stop the exporter."""
        try:
            self._processor.force_flush(int(timeout_ms))
            self._processor.shutdown()
        except Exception:
            log.exception("span_processor_shutdown_failed")
