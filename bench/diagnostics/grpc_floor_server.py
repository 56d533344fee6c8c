"""A bare grpc.aio GenerationService for bench/diagnostics/front_end_cpu.py --floor: the gRPC
library's own cost per call and per streamed chunk, with no tokenizer and no engine."""

from __future__ import annotations

import asyncio

import grpc

from specdec.v1 import generation_pb2, generation_pb2_grpc


class FloorServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate without a model: max_tokens chunks of one token, 1 ms apart, and the final."""

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        for i in range(request.max_tokens or 1):
            await asyncio.sleep(0.001)
            chunk = generation_pb2.GenerateChunk(text=" word", token_ids=[1000 + i])
            yield generation_pb2.GenerateResponse(request_id=request.request_id, chunk=chunk)
        final = generation_pb2.GenerateFinal(finish_reason=1, completion_tokens=request.max_tokens or 1)
        yield generation_pb2.GenerateResponse(request_id=request.request_id, final=final)


def serve_floor(address: str, ready) -> None:
    """Serves FloorServicer on `address` until killed; sets `ready` once listening (a child
    process's target)."""

    async def serve() -> None:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(FloorServicer(), server)
        server.add_insecure_port(address)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())
