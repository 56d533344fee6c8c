"""specdec-bench --connections: the calls of client c go through connection c mod N, each
connection its own (gRPC shares one per target unless told not to). A real grpc.aio server on
loopback records the peer (the client's address and port: one per connection) of every call."""

from __future__ import annotations

import asyncio
import collections
import json
import threading

import grpc
import pytest

from service.client.loadgen.cli import main as bench_main
from specdec.v1 import generation_pb2, generation_pb2_grpc


class PeerRecordingServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Answers every Generate with max_tokens one-token chunks and a final; records the peer."""

    def __init__(self) -> None:
        self.peers: dict[str, str] = {}  # request id -> peer

    async def GetServerInfo(self, request, context):  # noqa: N802 (gRPC method name)
        return generation_pb2.GetServerInfoResponse(target_model="stand-in")

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        self.peers[request.request_id] = context.peer()
        tokens = request.max_tokens or 1
        for i in range(tokens):
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id, chunk=generation_pb2.GenerateChunk(text="x", token_ids=[i])
            )
        yield generation_pb2.GenerateResponse(
            request_id=request.request_id,
            final=generation_pb2.GenerateFinal(finish_reason=1, completion_tokens=tokens),
        )


class StandInServer:
    def __init__(self) -> None:
        self.servicer = PeerRecordingServicer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> StandInServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def run_bench(port: int, tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["--target", f"127.0.0.1:{port}", "--prompts", "builtin:grounded", "--max-tokens", "3"]
    assert bench_main([*argv, "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def peers_by_client(servicer: PeerRecordingServicer, result: dict) -> dict[int, set[str]]:
    """The peers each client's requests came from (the report's --per-request client of each
    request index; request ids end in the index)."""
    peers: dict[int, set[str]] = collections.defaultdict(set)
    for run in result["runs"]:
        client_of = {r["index"]: r["client"] for r in run["per_request"]}
        prefix = f"-{run['mode']}-"
        for request_id, peer in servicer.peers.items():
            if prefix in request_id and "-warmup-" not in request_id:
                peers[client_of[int(request_id.rsplit("-", 1)[1])]].add(peer)
    return peers


@pytest.mark.parametrize("mode", ["burst", "sustained"])
def test_each_connection_is_its_own_and_client_c_uses_connection_c_mod_n(tmp_path, mode) -> None:
    """Four clients over three connections (not a multiple: request i and client c differ
    modulo 3 from the second round on)."""
    with StandInServer() as server:
        result = run_bench(
            server.port, tmp_path, "--modes", mode, "--concurrency", "4", "--burst-rounds", "2",
            "--requests-per-client", "2", "--connections", "3", "--methods", "none", "--per-request",
        )  # fmt: skip
        assert result["settings"]["connections"] == 3
        assert result["runs"][0]["requests"]["succeeded"] == 8
        peers = peers_by_client(server.servicer, result)
    # Each client kept one connection; clients 0 and 3 shared theirs; three distinct ones.
    assert sorted(peers) == [0, 1, 2, 3]
    assert all(len(p) == 1 for p in peers.values()), peers
    connection = {c: next(iter(p)) for c, p in peers.items()}
    assert connection[0] == connection[3]
    assert len({connection[c] for c in range(3)}) == 3


def test_one_connection_by_default(tmp_path) -> None:
    with StandInServer() as server:
        run_bench(server.port, tmp_path, "--modes", "burst", "--concurrency", "4", "--methods", "none")
        assert len(set(server.servicer.peers.values())) == 1
