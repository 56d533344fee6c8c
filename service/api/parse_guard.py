"""Registers a servicer so that a request which does not parse is answered INVALID_ARGUMENT.

The generated `add_..._to_server` parses each request with `FromString` before the handler
runs; a request that does not parse (bad UTF-8 in a string field, truncated or corrupt
bytes) then fails inside grpc with UNKNOWN "Unexpected <class 'DecodeError'>", which tells
the client neither that the fault is its own nor that retrying cannot help. Here the parse
failure is handed to the handler, which aborts with INVALID_ARGUMENT naming the message type
and the parser's reason; the servicer's method is never called with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor


class _Unparsed:
    """What the deserializer returns for bytes that are not a valid request."""

    __slots__ = ("message_type", "reason")

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type, self.reason = message_type, reason

    def details(self) -> str:
        return f"the request is not a valid {self.message_type}: {self.reason}"


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except protobuf_message.DecodeError as exc:
            return _Unparsed(name, str(exc) or "it does not decode")

    return parse


def _unary_unary(method: Callable) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
        return await method(request, context)

    return handle


def _unary_stream(method: Callable) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
        # aclosing: the method's own `finally` (cancelling engine work) runs however this ends.
        async with contextlib.aclosing(method(request, context)) as responses:
            async for response in responses:
                yield response

    return handle


def add_servicer(servicer: Any, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
    """Registers `servicer`'s methods for every RPC of `service` (unary requests only)."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{service.full_name}/{method.name}: client streaming")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            make_handler, handler = grpc.unary_stream_rpc_method_handler, _unary_stream(implementation)
        else:
            make_handler, handler = grpc.unary_unary_rpc_method_handler, _unary_unary(implementation)
        handlers[method.name] = make_handler(
            handler,
            request_deserializer=_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
