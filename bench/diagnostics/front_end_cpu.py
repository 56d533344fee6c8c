"""CPU time of the service's two processes per request and per streamed token: what one gRPC
front end can carry before it, not the engine, sets the pace.

    python -m bench.diagnostics.front_end_cpu                      # tiny random model, CPU
    python -m bench.diagnostics.front_end_cpu --model DIR --device cuda --dtype bfloat16

Starts `specdec-server` (bench/common/server_process.py; the engine core in its own process,
the default) and finds the engine core among its children (the process multiprocessing's
spawn started). Each point sends bursts of --concurrency requests through the load
generator's runner (service/client/loadgen/runner.py), first with max_tokens 1, then with
--max-tokens, and reads the CPU time of each process (every thread's, /proc/PID/task/*/schedstat,
nanoseconds) around each run. With the same requests in both runs,

    cpu(run) = a * requests + b * streamed tokens

gives b, the cost of each streamed token (an event from the core, a chunk on the stream:
at this concurrency a pass sends one message to the front end for all rows, and a stream
whose handler falls behind merges chunks), and a, the rest of a request's cost (the call,
tokenizing, the hop to the core, the final message), for each process. CPU that grows with
wall time rather than work (the engine core's spin while it waits for the GPU) lands in both.
A front end that needs `a * requests/s + b * tokens/s` of more than about one core (most of
its work is on its event loop, which holds the GIL) sets the pace.

--floor measures the same for a bare grpc.aio server instead
(bench/diagnostics/grpc_floor_server.py: no tokenizer, no engine; each Generate streams
max_tokens one-token chunks, each after a 1 ms asyncio sleep, then its final message): the
gRPC library's cost per call and per streamed message, plus that sleep's timer wake-up.

The client (this process) runs on the same machine and competes for its cores: on a machine
with few of them the figures include that contention. --pairs repeats the two runs,
alternated. Prints one JSON document (--out writes it too).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from bench.common.arguments import write_result
from bench.common.server_process import ServerProcess
from bench.diagnostics.grpc_floor_server import serve_floor
from service.client.loadgen.prompts import load_prompts
from service.client.loadgen.requests import build_request, greedy_settings
from service.client.loadgen.runner import Pacing, run_load
from specdec.v1 import generation_pb2_grpc
from testkit.processes import free_port


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of `pid`: the first field of /proc/PID/task/TID/schedstat,
    nanoseconds on a CPU (threads that ended are not counted: the service's threads live as
    long as it does). Raises ProcessLookupError when no thread could be read."""
    total, read = 0, 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
            read += 1
        except (OSError, ValueError, IndexError):
            pass  # the thread ended between the listing and the read
    if not read:
        raise ProcessLookupError(f"no thread of process {pid} could be read (has it exited?)")
    return total / 1e9


def engine_core_pid(server_pid: int) -> int:
    """The server's one child started by multiprocessing's spawn (the engine core). With
    --front-ends above 1 the other front ends are spawned too, and which is the core cannot
    be told from outside: refused (this tool measures one front end)."""
    spawned = []
    for child in _children(server_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    spawned.append(child)
        except OSError:
            continue
    if len(spawned) > 1:
        raise RuntimeError(
            f"{len(spawned)} spawned children of {server_pid}: is --front-ends above 1? "
            "This tool measures one front end and the engine core"
        )
    if not spawned:
        raise RuntimeError(
            f"no engine core process among the children of {server_pid}: is --engine-process thread set?"
        )
    return spawned[0]


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            children += [int(c) for c in f.read().split()]
    return children


async def _send_bursts(address: str, args: argparse.Namespace, max_tokens: int) -> tuple[int, int, float]:
    """--rounds bursts of --concurrency requests at `max_tokens`: (requests, streamed tokens, seconds)."""
    prompts = load_prompts(args.prompts)
    settings = greedy_settings(max_tokens)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def make(index: int):
            return build_request(settings, prompts[index % len(prompts)], args.method, f"fe-{index}", index)

        started = time.perf_counter()
        _, records = await run_load(
            [stub], make, Pacing("burst", args.concurrency, rounds=args.rounds), 300.0
        )
        seconds = time.perf_counter() - started
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0].status} {failed[0].error}")
    return len(records), sum(r.completion_tokens for r in records), seconds


def measure(address: str, pids: dict[str, int], args: argparse.Namespace, max_tokens: int) -> dict:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    requests, tokens, seconds = asyncio.run(_send_bursts(address, args, max_tokens))
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    return {
        "max_tokens": max_tokens,
        "requests": requests,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_s": cpu,
    }


def split_costs(short: dict, long: dict) -> dict[str, dict[str, float]]:
    """Per process: us per request (a) and per token (b), from two runs of the same requests
    (cpu = a * requests + b * tokens)."""
    if short["requests"] != long["requests"]:
        raise ValueError("the two runs need the same requests")
    if long["tokens"] <= short["tokens"]:
        raise ValueError("the second run needs more tokens than the first")
    out = {}
    for name in short["cpu_s"]:
        b = (long["cpu_s"][name] - short["cpu_s"][name]) / (long["tokens"] - short["tokens"])
        a = (short["cpu_s"][name] - b * short["tokens"]) / short["requests"]
        out[name] = {"us_per_request": a * 1e6, "us_per_token": b * 1e6}
    return out


def _pairs(address: str, pids: dict[str, int], args: argparse.Namespace) -> list[dict]:
    measure(address, pids, args, args.max_tokens)  # warm-up: every graph and cache
    runs = []
    for _ in range(args.pairs):
        short = measure(address, pids, args, 1)
        long = measure(address, pids, args, args.max_tokens)
        runs.append({"short": short, "long": long, "costs": split_costs(short, long)})
    return runs


def summarize(runs: list[dict]) -> dict[str, dict]:
    """The median and the range over the pairs of each process's a and b, each taken on its
    own (a and b of one pair move in opposite directions: a = cpu / requests - b when every
    request of the short run streams one token)."""
    processes = runs[0]["costs"]
    keys = ("us_per_request", "us_per_token")
    values = {p: {k: [run["costs"][p][k] for run in runs] for k in keys} for p in processes}
    return {
        "median": {p: {k: statistics.median(v) for k, v in kv.items()} for p, kv in values.items()},
        "range": {p: {k: [min(v), max(v)] for k, v in kv.items()} for p, kv in values.items()},
    }


def floor_runs(args: argparse.Namespace) -> list[dict]:
    address = f"127.0.0.1:{free_port()}"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=serve_floor, args=(address, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the floor server did not start")
        return _pairs(address, {"front_end": process.pid}, args)
    finally:
        process.kill()
        process.join(10)


def service_runs(args: argparse.Namespace) -> tuple[list[dict], str]:
    workdir = Path(tempfile.mkdtemp(prefix="specdec-fe-cpu-"))
    model = args.model
    if model is None:
        from bench.random_model import smollm2_tokenizer, write_random_model

        model = str(workdir / "tiny")
        write_random_model(Path(model), "tiny", smollm2_tokenizer(), device="cpu")
    server_args = [
        "--model", model, "--device", args.device, "--dtype", args.dtype,
        "--max-batch-size", str(args.concurrency), "--log-level", "WARNING", *args.server_arg,
    ]  # fmt: skip
    with ServerProcess(server_args, workdir / "server.log").start(timeout_s=600) as server:
        pids = {"front_end": server.process.pid, "engine_core": engine_core_pid(server.process.pid)}
        return _pairs(server.address, pids, args), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="model directory [default: bench.random_model's tiny shape with SmolLM2's tokenizer,"
        " written to a temporary folder]",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", default="builtin:grounded")
    parser.add_argument("--method", default="none", help="none, ngram, draft_model or default")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="bursts per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2, help="(1 token, --max-tokens) run pairs, alternated")
    parser.add_argument("--server-arg", action="append", default=[], help="one more argument for the server")
    parser.add_argument("--floor", action="store_true", help="measure a bare grpc.aio server")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs, model = (floor_runs(args), None) if args.floor else service_runs(args)
    result = {
        "settings": {**vars(args), "out": str(args.out) if args.out else None, "model": model},
        "cpus": os.cpu_count(),
        "runs": runs,
        **summarize(runs),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
