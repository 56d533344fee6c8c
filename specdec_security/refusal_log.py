"""RefusalLogInterceptor: every call a server refuses, because of what the caller sent,
leaves one structured log line `request_refused` (method, peer, status code, details; the
caller-chosen parts clipped), rate-limited by lines and bytes (log_limit.py).

Refusal codes: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, OUT_OF_RANGE,
PERMISSION_DENIED. UNAUTHENTICATED is logged by BearerTokenInterceptor as
`request_unauthenticated`. A message larger than the server's receive limit is refused by
gRPC itself (RESOURCE_EXHAUSTED) before any handler or interceptor sees it, so it is not
logged.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc
import structlog

from specdec_security.log_limit import LogLimiter, clip

log = structlog.get_logger(__name__)

REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
DETAILS_CHARS = 200


class RefusalLogInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limiter: LogLimiter | None = None) -> None:
        self.limiter = limiter or LogLimiter()

    def _watch(self, method: str, context: grpc.aio.ServicerContext) -> None:
        # The peer is read now, while the call is alive: in the done callback the call may be
        # released already, and peer() reads it (a crash of the process, seen in CI). code()
        # and details() read the context's own state and stay safe there.
        peer = clip(context.peer())

        def done(ctx) -> None:
            code = ctx.code()
            if code in REFUSAL_CODES:
                self.limiter.log(
                    log.warning,
                    "request_refused",
                    code.name,
                    method=clip(method),
                    peer=peer,
                    code=code.name,
                    details=clip(ctx.details() or "", DETAILS_CHARS),
                )

        context.add_done_callback(done)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        watch = self._watch
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for attribute, make in kinds:
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):

                async def watched(request, context, behavior=behavior):
                    watch(method, context)
                    async for response in behavior(request, context):
                        yield response
            elif inspect.iscoroutinefunction(behavior):

                async def watched(request, context, behavior=behavior):
                    watch(method, context)
                    return await behavior(request, context)
            else:  # a synchronous handler (none here): its context has no done callbacks
                return handler
            return make(
                watched,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
