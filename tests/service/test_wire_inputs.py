"""Requests that do not parse, and values at the edges of their ranges, over real gRPC."""

from __future__ import annotations

import grpc
import pytest

from specdec.v1 import generation_pb2
from tests.service.test_generate import collect, request

GENERATE = "/specdec.v1.GenerationService/Generate"
GET_SERVER_INFO = "/specdec.v1.GenerationService/GetServerInfo"

# GenerateRequest field 2 (text, a string): length 2, bytes that are not UTF-8.
BAD_UTF8_TEXT = b"\x12\x02\xff\xfe"
TRUNCATED = b"\x12\x10abc"  # field 2 says 16 bytes follow; 3 do


@pytest.mark.parametrize("wire", [BAD_UTF8_TEXT, TRUNCATED], ids=["bad-utf8", "truncated"])
def test_a_request_that_does_not_parse_gets_invalid_argument(run_service, make_stub, wire) -> None:
    service = run_service()
    with grpc.insecure_channel(service.address) as channel:
        generate = channel.unary_stream(
            GENERATE,
            request_serializer=None,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(generate(wire, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid specdec.v1.GenerateRequest" in info.value.details(), info.value.details()

        get_info = channel.unary_unary(
            GET_SERVER_INFO,
            request_serializer=None,
            response_deserializer=generation_pb2.GetServerInfoResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            get_info(b"\x08", timeout=30)  # a varint field with its value missing
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "specdec.v1.GetServerInfoRequest" in info.value.details()
    # The same bytes, well-formed, still work.
    assert collect(make_stub(service.address), request(max_tokens=2))[1].completion_tokens > 0


def test_a_request_id_of_128_printable_characters_is_echoed(run_service, make_stub) -> None:
    service = run_service()
    request_id = "r-" + "é" * 126
    _, final, echoed = collect(make_stub(service.address), request(max_tokens=2, request_id=request_id))
    assert echoed == request_id == final.metrics.request_id


@pytest.mark.parametrize("temperature", [1e-38, 1e-45])
def test_a_vanishing_temperature_decodes_greedily(run_service, make_stub, temperature) -> None:
    """Logits divided by 1e-38 overflow to inf and the softmax to NaN: every token came out
    as the last vocabulary id. Below 1e-5 the server decodes greedily, the limit of sampling
    as the temperature goes to 0."""
    service = run_service()
    stub = make_stub(service.address)
    greedy, _, _ = collect(
        stub, request(max_tokens=16, sampling=generation_pb2.SamplingParams(temperature=0.0))
    )
    tiny, final, _ = collect(
        stub, request(max_tokens=16, sampling=generation_pb2.SamplingParams(temperature=temperature, seed=3))
    )
    assert [t for c in tiny for t in c.token_ids] == [t for c in greedy for t in c.token_ids]
    assert final.completion_tokens == 16
