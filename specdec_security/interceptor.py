"""BearerTokenInterceptor: every RPC except the open services (grpc.health.v1) needs
`authorization: Bearer <token>` metadata with a token of the server's TokenSet.

A call without one is answered UNAUTHENTICATED before its handler runs (its request is not
even parsed) and logged with the method, the peer and the reason, never the token. Refusals
are logged at most LOG_BURST times per LOG_PERIOD_S per reason, within a byte budget, with
the method clipped; the next line logged says how many were left out (`not_logged`), so a
flood of bad calls cannot flood the log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import structlog

from specdec_security.log_limit import LogLimiter, clip
from specdec_security.tokens import TokenSet

log = structlog.get_logger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "
HEALTH_SERVICE = "grpc.health.v1.Health"
LOG_PERIOD_S = 10.0
LOG_BURST = 10

MISSING = "missing"
MALFORMED = "malformed"
REJECTED = "rejected"
MESSAGES = {
    MISSING: "missing bearer token: send the metadata 'authorization: Bearer <token>'",
    MALFORMED: "the authorization metadata is not 'Bearer <token>'",
    REJECTED: "the bearer token is not valid",
}


def bearer_token(metadata) -> tuple[str | None, str | None]:
    """(token, None) when the metadata carries one `Bearer` token, else (None, reason)."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if not values:
        return None, MISSING
    if len(values) > 1 or not isinstance(values[0], str):
        return None, MALFORMED
    value = values[0]
    if value[: len(BEARER)].lower() != BEARER or not value[len(BEARER) :].strip():
        return None, MALFORMED
    return value[len(BEARER) :].strip(), None


class _RefusalLog:
    def __init__(self) -> None:
        self._limiter = LogLimiter(LOG_PERIOD_S, LOG_BURST)

    def write(self, reason: str, method: str, peer: str) -> None:
        # the method of an unknown call is the caller's choice: clipped
        self._limiter.log(
            log.warning,
            "request_unauthenticated",
            reason,
            method=clip(method),
            peer=clip(peer),
            reason=reason,
        )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenSet, open_services: tuple[str, ...] = (HEALTH_SERVICE,)) -> None:
        self.tokens = tokens
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)
        self._refusals = _RefusalLog()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._open_prefixes):
            return await continuation(handler_call_details)
        token, reason = bearer_token(handler_call_details.invocation_metadata)
        if token is not None:
            if self.tokens.accepts(token):
                return await continuation(handler_call_details)
            reason = REJECTED
        handler = await continuation(handler_call_details)
        return self._refusal(handler, method, reason)

    def _refusal(
        self, handler: grpc.RpcMethodHandler | None, method: str, reason: str
    ) -> grpc.RpcMethodHandler:
        """A handler of the same kind as `handler` that refuses the call unread."""
        refusals = self._refusals

        async def refuse(_request, context: grpc.aio.ServicerContext) -> None:
            refusals.write(reason, method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGES[reason])

        # Raw bytes in (no deserializer): nothing an unauthenticated caller sends is parsed.
        if handler is not None and not handler.request_streaming:
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(refuse)
            return grpc.unary_unary_rpc_method_handler(refuse)
        if handler is not None and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        # streaming both ways, or a method this server does not have (refused the same way,
        # so an unauthenticated caller cannot tell which methods exist)
        return grpc.stream_stream_rpc_method_handler(refuse)
