"""`specdec-client`: stream a generation to the terminal, then show its metrics.

specdec-client "Write a haiku about GPUs"
specdec-client --chat "Rewrite: the cat sat on the mat." --json
specdec-client --concurrency 16 --requests 64 "Summarize: ..."   # quick load check
specdec-client --show-drafts "Repeat: one two three, one two three"  # which tokens were drafts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import grpc
from google.protobuf import json_format

from service.client.options import METHODS, add_security_arguments, open_channel, security_of
from specdec.v1 import generation_pb2, generation_pb2_grpc
from specdec_common.metrics_format import metrics_to_dict
from specdec_common.provenance import StreamProvenance
from specdec_common.request_limits import MAX_REQUEST_ID_CHARS
from specdec_security import SecuritySetupError


def build_request(args: argparse.Namespace, index: int = 0) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest()
    if args.request_id:
        request.request_id = args.request_id if index == 0 else f"{args.request_id}-{index}"
    if args.chat:
        request.messages.messages.add(role="user", content=args.prompt)
    else:
        request.text = args.prompt
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(request.sampling, name, value)
    request.stop.extend(args.stop or [])
    if args.method:
        request.speculation.method = METHODS[args.method]
    if args.k is not None:
        request.speculation.num_draft_tokens = args.k
    return request


def _bounded_int(low: int, high: int, what: str):
    """An argparse type: an integer in [low, high] (the proto field's range), named in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    return parse


UINT32 = _bounded_int(0, 2**32 - 1, "in [0, 2^32)")
UINT64 = _bounded_int(0, 2**64 - 1, "in [0, 2^64)")
POSITIVE = _bounded_int(1, 2**31 - 1, ">= 1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specdec-client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the prompt (raw text, or the user turn with --chat)")
    parser.add_argument(
        "--target",
        default=os.environ.get("SPECDEC_TARGET", "127.0.0.1:50051"),
        help="service address [env SPECDEC_TARGET, default 127.0.0.1:50051]",
    )
    parser.add_argument("--chat", action="store_true", help="send as a chat message (chat template)")
    parser.add_argument("--max-tokens", type=UINT32)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=UINT32)
    parser.add_argument("--seed", type=UINT64)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--method", choices=sorted(METHODS), help="drafter override")
    parser.add_argument("-k", "--num-draft-tokens", dest="k", type=UINT32, help="k override")
    parser.add_argument("--request-id", default="")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object per request")
    parser.add_argument("--concurrency", type=POSITIVE, default=1, help="requests in flight at once")
    parser.add_argument(
        "--requests", type=POSITIVE, default=None, help="total requests (default: --concurrency)"
    )
    parser.add_argument("--info", action="store_true", help="print GetServerInfo first")
    parser.add_argument(
        "--show-drafts",
        action="store_true",
        help="after the text, show each token's provenance per chunk: D an accepted "
        "draft (green on a terminal), t a token of the target's own",
    )
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    problem = security_of(args).problem()
    if problem:
        parser.error(problem)
    total = total_requests(args)
    longest = args.request_id + (f"-{total - 1}" if args.request_id and total > 1 else "")
    if len(longest) > MAX_REQUEST_ID_CHARS:
        parser.error(
            f"argument --request-id: {longest!r} is longer than the server's limit of "
            f"{MAX_REQUEST_ID_CHARS} characters"
        )
    return args


async def run_one(stub, request, timeout: float, stream_to: object | None, metadata=()) -> dict:
    started = time.monotonic()
    text: list[str] = []
    first_token_s = None
    final = None
    provenance = StreamProvenance()
    request_id = request.request_id
    async for response in stub.Generate(request, timeout=timeout, metadata=metadata):
        request_id = response.request_id
        if response.HasField("chunk"):
            if first_token_s is None and response.chunk.token_ids:
                first_token_s = time.monotonic() - started
            provenance.add(response.chunk)
            text.append(response.chunk.text)
            if stream_to is not None:
                stream_to.write(response.chunk.text)
                stream_to.flush()
        else:
            final = response.final
    elapsed = time.monotonic() - started
    return {
        "request_id": request_id,
        "text": "".join(text),
        "finish_reason": generation_pb2.GenerateFinal.DESCRIPTOR.fields_by_name["finish_reason"]
        .enum_type.values_by_number[final.finish_reason]
        .name,
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "client_seconds": round(elapsed, 4),
        "client_ttft_seconds": None if first_token_s is None else round(first_token_s, 4),
        "metrics": metrics_to_dict(final.metrics),
        "provenance": {
            "draft_flags": "".join("1" if f else "0" for f in provenance.draft_flags),
            "streamed_drafts": provenance.streamed_drafts,
            "cut_drafts": provenance.cut_drafts,
            "letters": provenance.as_letters(),
        },
    }


GREEN, RESET = "\x1b[32m", "\x1b[0m"


def describe_drafts(result: dict, color: bool) -> str:
    """The per-token provenance line of --show-drafts."""
    p = result["provenance"]
    letters = p["letters"].replace("D", f"{GREEN}D{RESET}") if color else p["letters"]
    return (
        f"drafts: {letters}\n{p['streamed_drafts']} of {len(p['draft_flags'])} streamed tokens were "
        f"accepted drafts, {p['cut_drafts']} more were cut by a stop condition "
        f"(accepted_drafts {result['metrics'].get('accepted_drafts', 0)})"
    )


def describe(result: dict) -> str:
    m = result["metrics"]
    rate = m.get("accept_rate")
    length = m.get("accept_length")
    tokens_per_s = result["completion_tokens"] / max(result["client_seconds"], 1e-9)
    return (
        f"[{result['request_id']}] {result['finish_reason']}: {result['prompt_tokens']} prompt + "
        f"{result['completion_tokens']} completion tokens in {result['client_seconds']:.2f} s "
        f"({tokens_per_s:.1f} tok/s) | method {m.get('method', '?')} k={m.get('num_draft_tokens', 0)} "
        f"| verify passes {m.get('verify_passes', 0)}, proposed {m.get('proposed_drafts', 0)}, "
        f"accepted {m.get('accepted_drafts', 0)}, accept rate "
        f"{'n/a' if rate is None else f'{rate:.3f}'}, accept length "
        f"{'n/a' if length is None else f'{length:.2f}'}"
    )


def total_requests(args: argparse.Namespace) -> int:
    """--requests, by default --concurrency."""
    return args.concurrency if args.requests is None else args.requests


async def amain(args: argparse.Namespace) -> int:
    total = total_requests(args)
    security = security_of(args)
    metadata = security.call_metadata()
    async with open_channel(args.target, security) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        if args.info:
            info = await stub.GetServerInfo(
                generation_pb2.GetServerInfoRequest(), timeout=10, metadata=metadata
            )
            print(
                json.dumps(json_format.MessageToDict(info, preserving_proto_field_name=True)), file=sys.stderr
            )
        if total == 1:
            result = await run_one(
                stub, build_request(args), args.timeout, None if args.json else sys.stdout, metadata
            )
            if args.json:
                print(json.dumps(result))
            else:
                print("\n" + describe(result), file=sys.stderr)
                if args.show_drafts:
                    print(describe_drafts(result, sys.stderr.isatty()), file=sys.stderr)
            return 0
        semaphore = asyncio.Semaphore(args.concurrency)
        started = time.monotonic()

        async def bounded(index: int) -> dict:
            async with semaphore:
                return await run_one(stub, build_request(args, index), args.timeout, None, metadata)

        results = await asyncio.gather(*(bounded(i) for i in range(total)), return_exceptions=True)
        wall = time.monotonic() - started
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if not isinstance(r, dict)]
    for result in ok:
        print(json.dumps(result) if args.json else describe(result))
        if args.show_drafts and not args.json:
            print(describe_drafts(result, sys.stdout.isatty()))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    tokens = sum(r["completion_tokens"] for r in ok)
    summary = {
        "requests": total,
        "succeeded": len(ok),
        "failed": len(errors),
        "wall_seconds": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "median_client_seconds": statistics.median(r["client_seconds"] for r in ok) if ok else None,
    }
    print(json.dumps(summary) if args.json else f"summary: {summary}", file=sys.stderr)
    return 0 if not errors else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args))
    except SecuritySetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
