"""specdec-bench: load a specdec gRPC server and report what its clients get.

Runs every combination of --methods, --modes and levels (--concurrency for burst and
sustained, --rate for rate) against one server, one after the other, and reports per run:
tokens/s and requests/s over the steady window, time to first token (TTFT) and inter-token
latency (ITL: the gap between consecutive streamed chunks) percentiles measured here from
the stream, and the server's own speculative counters summed from the final messages
(acceptance rate = sum accepted / sum proposed). Failed requests are counted per gRPC
status code; the run goes on.

examples:
  specdec-bench --methods none,ngram --modes sustained --concurrency 1,8 --out bench.json
  specdec-bench --prompts prompts.jsonl --modes rate --rate 2,4 --duration-s 30
  specdec-bench --modes burst --concurrency 32 --temperature 0.8 --seed 1 --plot bench.png

modes:
  burst      N requests sent at once (N = each --concurrency level), --burst-rounds times;
             window: the whole run
  sustained  N clients, each sending its next request as soon as its last one ended
             (closed loop), --requests-per-client each or until --duration-s; window: from
             the first end to the last start that followed an end (N in flight throughout)
  rate       open loop: Poisson arrivals at each --rate level (requests/s), --requests in
             all or until --duration-s; window: the whole run

prompts (--prompts): builtin:grounded, builtin:open_chat, builtin:all (the project's
benchmark prompts, sent as one user chat message each), or a JSONL file, one object a line:
  {"text": "Summarize: ...", "max_tokens": 64}
  {"messages": [{"role": "user", "content": "Hello"}]}
Request i uses prompt i modulo the set's size; a prompt's max_tokens overrides --max-tokens.

connections (--connections N): the requests go through N connections of their own (one
HTTP/2 connection carries every call by default); client c's (the c-th request of a burst, a
sustained client, the c-th arrival) through connection c mod N. A server with several
front-end processes (specdec-server --front-ends) spreads connections, not calls, between
them, so N clients are N connections.

output: a table on stderr as the runs finish; the JSON report on stdout, or in --out
(rewritten after each run). Per
run: requests (sent, succeeded, failed, errors_by_code), window, throughput (tokens_per_s
and requests_per_s over the window; whole_run_*; request_tokens_per_s = tokens over the sum
of request durations, at level 1 the in-process benchmarks' batch-1 figure), latency_s
(ttft, itl, tpot = time per output token after the first chunk, end_to_end, and the
server's own server_ttft and server_queue; each count, mean, p50, p90, p99, over the
successful requests that started in the window) and server_metrics (sums).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from service import __version__
from service.client.loadgen import report
from service.client.loadgen.prompts import Prompt, PromptSetError, load_prompts
from service.client.loadgen.requests import METHODS, build_request, server_info
from service.client.loadgen.runner import Pacing, run_load
from service.client.loadgen.stats import RequestRecord, summarize
from service.client.options import add_security_arguments, open_stubs, security_of
from specdec.v1 import generation_pb2
from specdec_common.metrics_format import metrics_to_dict
from specdec_common.request_limits import MAX_REQUEST_ID_CHARS
from specdec_security import SecuritySetupError

MODES = ("burst", "sustained", "rate")
DEFAULT_REQUESTS_PER_CLIENT = 4
DEFAULT_RATE_REQUESTS = 32


def _list_of(parse, what: str):
    """An argparse type: a comma-separated list of `what`, each checked by `parse`."""

    def parse_list(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
        try:
            values = [parse(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}"
            ) from None
        return values

    return parse_list


def _positive(cast):
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise ValueError(text)
        return value

    return parse


def _choice(choices: Sequence[str]):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="specdec-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("SPECDEC_TARGET", "127.0.0.1:50051"),
        help="server address [env SPECDEC_TARGET, default 127.0.0.1:50051]",
    )
    parser.add_argument(
        "--prompts",
        default="builtin:all",
        help="builtin:grounded|open_chat|all or a JSONL file [default builtin:all]",
    )
    parser.add_argument(
        "--methods",
        type=_list_of(_choice(tuple(METHODS)), "of " + ", ".join(METHODS)),
        default=["default"],
        help="drafters to run, each a run of its own: "
        "default (the server's), none, ngram, draft_model [default: default]",
    )
    parser.add_argument(
        "--modes",
        type=_list_of(_choice(MODES), "of " + ", ".join(MODES)),
        default=["sustained"],
        help="burst, sustained, rate [default sustained]",
    )
    parser.add_argument(
        "--concurrency",
        type=_list_of(_positive(int), "positive integers"),
        default=[1],
        help="levels for burst and sustained, e.g. 1,8,32 [default 1]",
    )
    parser.add_argument(
        "--burst-rounds",
        type=_positive(int),
        default=1,
        help="burst: send this many bursts of N, each once the last one ended, as one run (a "
        "single burst's figures vary from one to the next); request i takes prompt i modulo "
        "the set's size throughout, so a later round may start at another prompt [default 1]",
    )
    parser.add_argument(
        "--connections",
        type=_positive(int),
        default=1,
        help="connections to the server, client c's requests through connection c mod N "
        "[default 1: every call on one]",
    )
    parser.add_argument(
        "--rate",
        type=_list_of(_positive(float), "positive numbers"),
        default=None,
        help="requests/s levels for the rate mode, e.g. 2,5",
    )
    parser.add_argument(
        "--requests-per-client",
        type=_positive(int),
        default=None,
        help=f"sustained: requests per client [default {DEFAULT_REQUESTS_PER_CLIENT} unless --duration-s]",
    )
    parser.add_argument(
        "--requests",
        type=_positive(int),
        default=None,
        help=f"rate: requests in all [default {DEFAULT_RATE_REQUESTS} unless --duration-s]",
    )
    parser.add_argument(
        "--duration-s",
        type=_positive(float),
        default=None,
        help="sustained and rate: stop sending new requests after this many seconds",
    )
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed requests sent at once before each run [default 0]"
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive(int),
        default=None,
        help="max_tokens of prompts that do not set their own [default: the server's]",
    )
    parser.add_argument(
        "-k",
        "--num-draft-tokens",
        dest="k",
        type=int,
        default=None,
        help="k per request [default: the server's]",
    )
    parser.add_argument("--temperature", type=float, default=None, help="0 or absent: greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed of request i is SEED + i (reproducible sampled runs)",
    )
    parser.add_argument("--arrival-seed", type=int, default=0, help="rate: seed of the arrival times")
    parser.add_argument("--timeout-s", type=_positive(float), default=300.0, help="deadline per request")
    parser.add_argument(
        "--connect-timeout-s",
        type=_positive(float),
        default=60.0,
        help="how long to wait for the server to answer GetServerInfo (it may be loading)",
    )
    parser.add_argument(
        "--request-id-prefix",
        default="bench",
        help="request ids are PREFIX-METHOD-MODE-LEVEL-INDEX (shown in the server's logs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument(
        "--per-request",
        action="store_true",
        help="include every request's timings and server metrics in the JSON",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib: the bench extra)"
    )
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    problem = security_of(args).problem()
    if problem:
        parser.error(problem)
    if "rate" in args.modes and not args.rate:
        parser.error("argument --rate: the rate mode needs at least one rate (requests/s)")
    if args.warmup < 0:
        parser.error("argument --warmup: must be >= 0")
    longest = f"{args.request_id_prefix}-draft_model-sustained-{max(args.concurrency)}-{10**9}"
    if len(longest) > MAX_REQUEST_ID_CHARS:
        parser.error(
            f"argument --request-id-prefix: request ids would be longer than the server's limit "
            f"of {MAX_REQUEST_ID_CHARS} characters"
        )
    if args.plot is not None:
        try:
            report.require_matplotlib()
        except report.PlotUnavailableError as exc:
            parser.error(str(exc))
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, Pacing]]:
    """(method, pacing) of every run, in running order."""
    runs = []
    for method in args.methods:
        for mode in args.modes:
            if mode == "rate":
                requests = args.requests or (None if args.duration_s else DEFAULT_RATE_REQUESTS)
                levels = args.rate
            else:
                requests = args.requests_per_client or (
                    None if args.duration_s else DEFAULT_REQUESTS_PER_CLIENT
                )
                levels = args.concurrency
            for level in levels:
                runs.append(
                    (
                        method,
                        Pacing(
                            mode,
                            level,
                            requests if mode != "burst" else None,
                            args.duration_s if mode != "burst" else None,
                            args.arrival_seed,
                            args.burst_rounds if mode == "burst" else 1,
                        ),
                    )
                )
    return runs


def per_request(records: Sequence[RequestRecord], run_start: float) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index,
            "client": r.client,
            "status": r.status,
            "error": r.error or None,
            "start_s": r.start - run_start,
            "end_s": None if r.end is None else r.end - run_start,
            "ttft_s": r.ttft,
            "chunks": len(r.chunk_times),
            "streamed_tokens": sum(r.chunk_tokens),
            "finish_reason": r.finish_reason or None,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "metrics": None if r.metrics is None else metrics_to_dict(r.metrics),
        }
        for r in records
    ]


async def amain(args: argparse.Namespace, prompts: list[Prompt]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "tool": "specdec-bench",
        "version": __version__,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": ["specdec-bench", *args.argv],
        "client_host": platform.node(),
        "target": args.target,
        "prompts": {"spec": args.prompts, "count": len(prompts)},
        "settings": {
            name: getattr(args, name)
            for name in (
                "max_tokens",
                "k",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "warmup",
                "timeout_s",
                "requests_per_client",
                "requests",
                "duration_s",
                "arrival_seed",
                "burst_rounds",
                "connections",
            )
        },
        "runs": [],
    }
    security = security_of(args)
    metadata = security.call_metadata()
    async with contextlib.AsyncExitStack() as channels:
        stubs = await open_stubs(channels, args.target, security, args.connections)
        # On every connection, so that each is up (and its server serving) before the timed runs.
        infos = await asyncio.gather(*(server_info(stub, args.connect_timeout_s, metadata) for stub in stubs))
        info = infos[0]
        result["server_info"] = json_format.MessageToDict(info, preserving_proto_field_name=True)
        for method, pacing in plan(args):
            level = f"{pacing.level:g}"
            prefix = f"{args.request_id_prefix}-{method}-{pacing.mode}-{level}"

            def make(
                index: int, prefix: str = prefix, method: str = method
            ) -> generation_pb2.GenerateRequest:
                return build_request(args, prompts[index % len(prompts)], method, f"{prefix}-{index}", index)

            if args.warmup:
                warm = Pacing("burst", args.warmup)
                await run_load(
                    stubs,
                    lambda i, method=method, prefix=prefix: build_request(
                        args,
                        prompts[i % len(prompts)],
                        method,
                        f"{prefix}-warmup-{i}",
                        i,
                    ),
                    warm,
                    args.timeout_s,
                    metadata,
                )
            run_start, records = await run_load(stubs, make, pacing, args.timeout_s, metadata)
            run = {"method": method, **summarize(pacing.mode, pacing.level, records, run_start)}
            if args.per_request:
                run["per_request"] = per_request(records, run_start)
            result["runs"].append(run)
            print(report.table([run]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.out is not None:  # an interrupted invocation keeps the runs it finished
                write_json(args.out, result)
    return result


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        prompts = load_prompts(args.prompts)
    except PromptSetError as exc:
        print(f"specdec-bench: error: --prompts: {exc}", file=sys.stderr)
        return 2
    print(report.table([]), file=sys.stderr, flush=True)
    try:
        result = asyncio.run(amain(args, prompts))
    except SecuritySetupError as exc:
        print(f"specdec-bench: error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"specdec-bench: error: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    if args.out is not None:
        write_json(args.out, result)
    else:
        print(json.dumps(result, indent=1))
    if args.plot is not None:
        info = result.get("server_info", {})
        report.plot(
            result["runs"],
            args.plot,
            f"specdec-bench: {info.get('target_model', '?')} on {info.get('device', '?')} "
            f"({args.prompts}, max_tokens {args.max_tokens or 'server default'})",
        )
    succeeded = sum(run["requests"]["succeeded"] for run in result["runs"])
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
