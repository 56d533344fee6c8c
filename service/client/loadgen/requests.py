"""What specdec-bench sends: a GenerateRequest per prompt, method and index, and the server's
description, asked for with retries while it loads."""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

import grpc

from service.client.loadgen.prompts import Prompt
from service.client.options import METHODS as CLIENT_METHODS
from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from specdec_security.client import Metadata

# "default" sends no method: the server's default drafter.
METHODS = {"default": metrics_pb2.SPECULATION_METHOD_UNSPECIFIED, **CLIENT_METHODS}


def build_request(
    args: argparse.Namespace, prompt: Prompt, method: str, request_id: str, index: int
) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(request_id=request_id)
    if prompt.text is not None:
        request.text = prompt.text
    else:
        for role, content in prompt.messages:
            request.messages.messages.add(role=role, content=content)
    max_tokens = prompt.max_tokens if prompt.max_tokens is not None else args.max_tokens
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    if args.top_p is not None:
        request.sampling.top_p = args.top_p
    if args.top_k is not None:
        request.sampling.top_k = args.top_k
    if args.seed is not None:
        request.sampling.seed = (args.seed + index) % 2**64
    if METHODS[method] != metrics_pb2.SPECULATION_METHOD_UNSPECIFIED:
        request.speculation.method = METHODS[method]
    if args.k is not None:
        request.speculation.num_draft_tokens = args.k
    return request


def greedy_settings(max_tokens: int) -> SimpleNamespace:
    """The settings build_request reads, for a greedy request of `max_tokens` with the
    server's k (what the benchmarks send)."""
    return SimpleNamespace(max_tokens=max_tokens, temperature=None, top_p=None, top_k=None, seed=None, k=None)


async def server_info(
    stub: generation_pb2_grpc.GenerationServiceStub, timeout_s: float, metadata: Metadata = ()
) -> generation_pb2.GetServerInfoResponse:
    """GetServerInfo, retried while the server is unreachable or still loading its models."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await stub.GetServerInfo(
                generation_pb2.GetServerInfoRequest(),
                timeout=max(0.1, min(10.0, deadline - time.monotonic())),
                wait_for_ready=True,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if not retryable or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)
