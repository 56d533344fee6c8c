"""Realistic-size decoding, in-process and through the gRPC service in the same run.

    python -m bench.random_model --shape llama-3.1-8b --shape llama-3.2-1b --out bench/out/models
    python -m bench.service_decode --sizes 8b --out bench/out/service_decode.json

Per size (--sizes: 8b = the random Llama-3.1-8B-shaped target with the Llama-3.2-1B-shaped
draft model, 1b = the 1B shape alone, 135m = SmolLM2-135M's shape with random weights, tiny
= bench.random_model's tiny pair for CPU smoke runs; the directories are
--models-dir/<shape>; the draft model is loaded only when --methods holds draft_model), per
path (--paths):

  inprocess  the engine in this process, built by the service's own load_engine from the
             same server arguments (service/server.py: load, vocabulary check, warm-up);
  grpc       `specdec-server` with those arguments as a child process on a loopback port,
             loaded through the gRPC API by specdec-bench's runner (service/client/loadgen),
             once per --engine-process mode: rows `grpc` with the engine in a process of its
             own (the default), `grpc-thread` with it on a thread of the server, so that one
             run compares the two;

and per prompt set (--prompts, specdec-bench's: builtin:grounded, builtin:open_chat,
builtin:all, or a JSONL file), method (--methods: none, ngram, draft_model) and pacing:

  batch1     one request at a time, every prompt --batch1-repeats times; the figure is
             tokens over the sum of request durations (bench/gpu_decode.py's batch-1 figure);
  burst      N requests at once, for each N of --concurrency, --burst-rounds times one after
             the other; the figure is over the run (all its rounds); with
             --interleave-methods the methods' bursts take turns instead (below);
  sustained  N clients sending back to back (--requests-per-client each); the figure is
             over the steady window (N in flight throughout).

Both paths are measured by one definition (service/client/loadgen/stats.py, on the same request
records): tokens/s, time to first token and inter-token latency (the gap between streamed
chunks) p50 / p99, next to every figure. Every batch-1 figure (batch1, and level 1 of burst
and sustained) has the roofline next to it: the target's weight bytes over the device copy
bandwidth measured at the start of the run (bench/common/roofline.py).

Bounded: greedy, --new-tokens per request (EOS may end one earlier), an untimed warm-up of
--warmup short requests per (prompt set, method), a time budget (--budget-s skips every
block that would start after it, and the JSON lists them). The JSON is rewritten after every
block; --append adds this command's rows to an existing file (each row names its run, the
summary's ratios compare rows of one run), so a sweep can be split under a per-command
time limit.

CPU smoke run (a few minutes on two cores; writes the tiny pair first):

    python -m bench.service_decode --sizes tiny --write-missing --device cpu --dtype float32 \\
        --new-tokens 8 --concurrency 1,2 --requests-per-client 3 --out bench/out/smoke_service.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()  # before the heavy imports: the logged times include them

import torch  # noqa: E402

from bench.common.arguments import add_gemv_max_rows, positive_ints, subset_of, write_result  # noqa: E402
from bench.common.inprocess_load import run_inprocess  # noqa: E402
from bench.common.roofline import checkpoint_weight_bytes, copy_bandwidth, roofline_tokens_per_s  # noqa: E402
from bench.common.server_process import ServerProcess  # noqa: E402
from bench.common.time_budget import Budget  # noqa: E402
from service.api.request_mapping import RequestLimits, to_engine_request  # noqa: E402
from service.client.loadgen.prompts import Prompt, load_prompts  # noqa: E402
from service.client.loadgen.requests import build_request, greedy_settings, server_info  # noqa: E402
from service.client.loadgen.runner import Pacing, run_load  # noqa: E402
from service.client.loadgen.stats import join_runs, summarize  # noqa: E402
from service.client.options import open_stubs  # noqa: E402
from service.config import ServiceConfig  # noqa: E402
from specdec_common.settings import positive_int  # noqa: E402
from specdec_security import ClientSecurity  # noqa: E402

# size -> (target shape, draft shape or None); directories are --models-dir/<shape>.
SIZES = {
    "8b": ("llama-3.1-8b", "llama-3.2-1b"),
    "1b": ("llama-3.2-1b", None),
    "135m": ("smollm2-135m", None),
    "tiny": ("tiny", "tiny-draft"),
}
PATHS = ("inprocess", "grpc")
ENGINE_PROCESS_MODES = ("process", "thread")


def grpc_path(engine_process: str) -> str:
    """The rows' path label of the gRPC path with the server's --engine-process mode."""
    return "grpc" if engine_process == "process" else f"grpc-{engine_process}"


METHODS = ("none", "ngram", "draft_model")
MODES = ("batch1", "burst", "sustained")
WARMUP_MAX_TOKENS = 16


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Turn:
    """One burst of a method's interleaved rounds (--interleave-methods): round `index` of
    `rounds`; its requests are numbered from index * level on, as the rounds of one run are."""

    index: int
    rounds: int


# (prompt set, method, mode, pacing, turn): turn is None for a measurement run as one piece.
Block = tuple[str, str, str, Pacing, Turn | None]


def blocks(args: argparse.Namespace, prompt_sets: dict[str, list[Prompt]], methods: list[str]) -> list[Block]:
    """Every measurement of one path, in running order: per prompt set and pacing point, the
    methods one after the other (so that their ratios compare runs minutes apart at most).
    With --interleave-methods and --burst-rounds R > 1, a burst point is R turns instead:
    turn r runs one burst of every method, their order rotated by r, so that no method is
    always the first or the last at a level."""
    out: list[Block] = []
    for spec, prompts in prompt_sets.items():
        points = []
        if "batch1" in args.modes:
            points.append(("batch1", Pacing("sustained", 1, len(prompts) * args.batch1_repeats)))
        for level in args.concurrency:
            for mode in ("burst", "sustained"):
                if mode in args.modes:
                    per_client = args.requests_per_client if mode == "sustained" else None
                    rounds = args.burst_rounds if mode == "burst" else 1
                    points.append((mode, Pacing(mode, level, per_client, rounds=rounds)))
        for mode, pacing in points:
            if mode == "burst" and pacing.rounds > 1 and args.interleave_methods:
                one = dataclasses.replace(pacing, rounds=1)
                for r in range(pacing.rounds):
                    for i in range(len(methods)):
                        method = methods[(i + r) % len(methods)]
                        out.append((spec, method, mode, one, Turn(r, pacing.rounds)))
                continue
            for method in methods:
                out.append((spec, method, mode, pacing, None))
    return out


class TurnCollector:
    """Holds the runs of interleaved turns until a method's last one at a point is in; then
    they are one run (join_runs: the runs' own durations summed, the other methods' bursts
    between them left out)."""

    def __init__(self) -> None:
        self._runs: dict[tuple, list[tuple[float, list]]] = {}
        self._levels: dict[tuple, bool] = {}  # interleaved level -> whether the budget let it start

    def allowed(self, level: tuple, turn: Turn | None, budget: Budget, what: str) -> bool:
        """Whether to run a block: one run as one piece asks the budget itself; an interleaved
        level asks once, at its first burst, and then runs every turn (each method's row
        needs all of them, and the level's rows compare with one another)."""
        if turn is None:
            return budget.allows(what)
        if level not in self._levels:
            self._levels[level] = budget.allows(
                f"{what} and the other methods ({turn.rounds} interleaved turns)"
            )
        return self._levels[level]

    def add(
        self, key: tuple, turn: Turn | None, run_start: float, records: list
    ) -> tuple[float, list] | None:
        """(run start, records) of the whole measurement, or None while turns are missing."""
        if turn is None:
            return run_start, records
        runs = self._runs.setdefault(key, [])
        runs.append((run_start, records))
        if len(runs) < turn.rounds:
            return None
        del self._runs[key]
        return join_runs(runs)


def first_index(pacing: Pacing, turn: Turn | None) -> int:
    """The number of a run's first request: later turns go on where the earlier ones ended."""
    return 0 if turn is None else turn.index * int(pacing.level)


def whole_pacing(pacing: Pacing, turn: Turn | None) -> Pacing:
    """The pacing a row reports: an interleaved measurement's rounds are its turns."""
    return pacing if turn is None else dataclasses.replace(pacing, rounds=turn.rounds)


def server_args(args: argparse.Namespace, target: Path, draft: Path | None) -> list[str]:
    """The service's arguments, shared by both paths."""
    largest = max(args.concurrency) if set(args.modes) & {"burst", "sustained"} else 1
    out = [
        "--model",
        str(target),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--num-draft-tokens",
        str(args.k),
        "--max-num-draft-tokens",
        str(max(args.k, 8)),
        "--max-batch-size",
        str(args.max_batch_size or largest),
        "--max-queue-size",
        str(max(64, 2 * largest)),
        "--default-max-tokens",
        str(args.new_tokens),
        "--max-tokens-limit",
        str(max(4096, args.new_tokens)),
        "--adaptive-draft-length",
        "false" if args.fixed_k else "true",
        "--telemetry-target",
        args.telemetry_target,
        "--instance-id",
        "bench-service-decode",
        "--log-level",
        args.server_log_level,
    ]
    if draft is not None:
        out += ["--draft-model", str(draft)]
    if args.linear_blocks is not None:
        out += ["--linear-blocks", str(args.linear_blocks)]
    if args.gemv_max_rows is not None:
        out += ["--gemv-max-rows", str(args.gemv_max_rows)]
    if args.max_prefill_tokens_per_pass is not None:
        out += ["--max-prefill-tokens-per-pass", str(args.max_prefill_tokens_per_pass)]
    if args.prefill_graph_tokens is not None:
        out += ["--prefill-graph-tokens", str(args.prefill_graph_tokens)]
    return out


# ---------------------------------------------------------------------------- a row


def row_of(
    size: str,
    path: str,
    spec: str,
    method: str,
    mode: str,
    pacing: Pacing,
    report: dict,
    roofline: float | None,
) -> dict:
    latency, throughput = report["latency_s"], report["throughput"]
    tokens_per_s = throughput["request_tokens_per_s"] if mode == "batch1" else throughput["tokens_per_s"]

    def ms(value):
        return None if value is None else value * 1e3

    row = {
        "size": size,
        "path": path,
        "prompts": spec,
        "method": method,
        "mode": mode,
        "level": int(pacing.level),
        "rounds": pacing.rounds,
        "tokens_per_s": tokens_per_s,
        "ttft_p50_ms": ms(latency["ttft"]["p50"]),
        "ttft_p99_ms": ms(latency["ttft"]["p99"]),
        "itl_p50_ms": ms(latency["itl"]["p50"]),
        "itl_p99_ms": ms(latency["itl"]["p99"]),
        "accept_rate": report["server_metrics"]["accept_rate"],
        "requests_failed": report["requests"]["failed"],
    }
    if pacing.level == 1:
        row["roofline_tokens_per_s"] = roofline
        row["fraction_of_roofline"] = tokens_per_s / roofline if roofline and tokens_per_s else None
    row["report"] = report
    return row


def row_key(row: dict) -> tuple:
    return row["size"], row["path"], row["prompts"], row["method"], row["mode"], row["level"]


# ---------------------------------------------------------------------------- the paths


def measure_inprocess(args, size, config_args, plan, prompt_sets, roofline, add_row, budget, info) -> None:
    from service.server import load_engine

    started = time.perf_counter()
    engine, tokenizer = load_engine(ServiceConfig.from_args(config_args, environ={}))
    info["load_seconds"] = time.perf_counter() - started
    log(f"{size} inprocess: engine ready in {info['load_seconds']:.1f} s")
    limits = RequestLimits(1 << 30, 1 << 30)
    templates: dict[tuple, Any] = {}  # tokenized once, as the server does it: the runs time the engine

    def factory(spec: str, method: str, prefix: str, max_tokens: int) -> Callable[[int], Any]:
        prompts = prompt_sets[spec]
        settings = greedy_settings(max_tokens)

        def make(index: int):
            key = (spec, index % len(prompts), method, max_tokens)
            if key not in templates:
                proto = build_request(settings, prompts[key[1]], method, prefix, index)
                templates[key] = to_engine_request(proto, proto.request_id, tokenizer, limits)
            return dataclasses.replace(templates[key], request_id=f"{prefix}-{index}")

        return make

    try:
        warmed = set()
        turns = TurnCollector()
        for spec, method, mode, pacing, turn in plan:
            what = f"{size} inprocess {spec} {method} {mode} {pacing.level:g}"
            if not turns.allowed((spec, mode, pacing.level), turn, budget, what):
                continue
            if (spec, method) not in warmed and args.warmup:
                warmed.add((spec, method))
                run_inprocess(
                    engine,
                    factory(spec, method, f"warm-{method}", WARMUP_MAX_TOKENS),
                    Pacing("burst", args.warmup),
                    args.timeout_s,
                )
            make = factory(spec, method, f"{mode}-{method}", args.new_tokens)
            first = first_index(pacing, turn)
            run = run_inprocess(
                engine, lambda i, make=make, first=first: make(first + i), pacing, args.timeout_s
            )
            whole = turns.add((spec, method, mode, pacing.level), turn, *run)
            if whole is None:
                continue
            run_start, records = whole
            add_row(
                row_of(
                    size,
                    "inprocess",
                    spec,
                    method,
                    mode,
                    whole_pacing(pacing, turn),
                    summarize(pacing.mode, pacing.level, records, run_start),
                    roofline,
                )
            )
    finally:
        engine.stop()
        engine = tokenizer = None  # frees the model before the gRPC path
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            info["cuda_memory_allocated_after_stop"] = torch.cuda.memory_allocated()


def measure_grpc(
    args, size, config_args, plan, prompt_sets, roofline, add_row, budget, info, engine_process="process"
) -> None:
    path = grpc_path(engine_process)
    front_ends = ["--front-ends", str(args.front_ends)] if engine_process == "process" else []
    server = ServerProcess(
        [*config_args, "--engine-process", engine_process, *front_ends],
        args.out.with_name(f"{args.out.stem}.{size}.{path}.server.log"),
    )
    info["server_command"] = server.command
    info["server_log"] = str(server.log_path)
    with server:
        server.start(args.server_start_timeout_s)
        info["ready_seconds"] = server.ready_seconds
        log(f"{size} {path}: server ready at {server.address} in {server.ready_seconds:.1f} s")
        asyncio.run(
            _grpc_blocks(args, size, path, server.address, plan, prompt_sets, roofline, add_row, budget)
        )
        info["server_exit_status"] = server.stop()


async def _grpc_blocks(args, size, path, address, plan, prompt_sets, roofline, add_row, budget) -> None:
    async with contextlib.AsyncExitStack() as channels:
        stubs = await open_stubs(channels, address, ClientSecurity(), args.connections)
        # Every connection up, and the front end it reached serving, before anything is timed.
        await asyncio.gather(*(server_info(stub, args.server_start_timeout_s) for stub in stubs))
        warmed = set()
        turns = TurnCollector()
        for spec, method, mode, pacing, turn in plan:
            what = f"{size} {path} {spec} {method} {mode} {pacing.level:g}"
            if not turns.allowed((spec, mode, pacing.level), turn, budget, what):
                continue
            prompts = prompt_sets[spec]

            def factory(prefix: str, max_tokens: int, method: str = method, prompts=prompts, first: int = 0):
                settings = greedy_settings(max_tokens)
                return lambda i: build_request(
                    settings, prompts[(first + i) % len(prompts)], method, f"{prefix}-{first + i}", first + i
                )

            if (spec, method) not in warmed and args.warmup:
                warmed.add((spec, method))
                await run_load(
                    stubs,
                    factory(f"warm-{method}", WARMUP_MAX_TOKENS),
                    Pacing("burst", args.warmup),
                    args.timeout_s,
                )
            run = await run_load(
                stubs,
                factory(f"{mode}-{method}", args.new_tokens, first=first_index(pacing, turn)),
                pacing,
                args.timeout_s,
            )
            whole = turns.add((spec, method, mode, pacing.level), turn, *run)
            if whole is None:
                continue
            run_start, records = whole
            add_row(
                row_of(
                    size,
                    path,
                    spec,
                    method,
                    mode,
                    whole_pacing(pacing, turn),
                    summarize(pacing.mode, pacing.level, records, run_start),
                    roofline,
                )
            )


def measurements(args: argparse.Namespace) -> list[tuple[str, Callable[..., None]]]:
    """(row path, measure function) in running order: --paths, the gRPC one per --engine-process."""
    out: list[tuple[str, Callable[..., None]]] = []
    for path in args.paths:
        if path == "grpc":
            for mode in args.engine_process:
                out.append((grpc_path(mode), functools.partial(measure_grpc, engine_process=mode)))
        else:
            out.append((path, measure_inprocess))
    return out


# ---------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service_decode",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    parser.add_argument(
        "--sizes", type=subset_of(tuple(SIZES)), default=["8b"], help=f"subset of {', '.join(SIZES)}"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a model directory (safetensors + tokenizer, e.g. a converted GGUF in the model "
        "cache) measured instead of --sizes, labelled 'model'; --draft-model-dir for its draft",
    )
    parser.add_argument("--draft-model-dir", type=Path, default=None, help="the --model's draft model")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path("bench/out/models"),
        help="where bench.random_model wrote the shapes (<dir>/<shape>)",
    )
    parser.add_argument(
        "--write-missing",
        action="store_true",
        help="write a missing model directory first (bench.random_model, on --device)",
    )
    parser.add_argument(
        "--paths", type=subset_of(PATHS), default=list(PATHS), help="inprocess, grpc (run in this order)"
    )
    parser.add_argument(
        "--methods",
        type=subset_of(METHODS),
        default=list(METHODS),
        help="none, ngram, draft_model (draft_model needs a size with a draft model)",
    )
    parser.add_argument(
        "--engine-process",
        type=subset_of(ENGINE_PROCESS_MODES),
        default=["process"],
        help="the server's --engine-process for the grpc path, one server each, in this order: "
        "process (rows 'grpc'), thread (rows 'grpc-thread'); e.g. process,thread to compare",
    )
    parser.add_argument(
        "--linear-blocks",
        type=Path,
        help="the service's --linear-blocks (both paths): a JSON table of the invariant kernels' "
        "block shapes over the committed one",
    )
    add_gemv_max_rows(parser, "the service's (both paths)")
    parser.add_argument(
        "--modes", type=subset_of(MODES), default=list(MODES), help="batch1, burst, sustained"
    )
    parser.add_argument(
        "--concurrency", type=positive_ints, default=[1, 4, 16, 32, 64], help="levels of burst and sustained"
    )
    parser.add_argument(
        "--prompts",
        type=lambda s: [x for x in s.split(",") if x],
        default=["builtin:grounded", "builtin:open_chat"],
        help="comma-separated specdec-bench prompt sets (builtin:... or JSONL files)",
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="max_tokens of every timed request")
    parser.add_argument(
        "-k", type=int, default=8, help="the server's draft length (the adaptive policy's cap)"
    )
    parser.add_argument("--fixed-k", action="store_true", help="turn the adaptive draft length off")
    parser.add_argument("--batch1-repeats", type=int, default=2, help="batch1: runs of every prompt")
    parser.add_argument(
        "--burst-rounds",
        type=int,
        default=1,
        help="burst: rounds of each burst, one after the other, measured as one run",
    )
    parser.add_argument(
        "--interleave-methods",
        action="store_true",
        help="burst, with --burst-rounds R > 1: at each level the methods take turns, one burst "
        "each, R times, the order rotated every turn (plain, n-gram, draft model; n-gram, draft "
        "model, plain; ...); each method's R bursts are measured as one run over their own "
        "durations, so no method always runs first at a level",
    )
    parser.add_argument("--requests-per-client", type=int, default=4, help="sustained: requests per client")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help=f"untimed requests ({WARMUP_MAX_TOKENS} tokens) at once per prompt set and method",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="the server's --max-batch-size [default: the largest --concurrency level]",
    )
    parser.add_argument(
        "--max-prefill-tokens-per-pass",
        type=int,
        default=None,
        help="the server's --max-prefill-tokens-per-pass (both paths) [default: the server's]: "
        "the prompt tokens a pass may prefill, against the delay decode rows wait behind them",
    )
    parser.add_argument(
        "--prefill-graph-tokens",
        type=int,
        default=None,
        help="the server's --prefill-graph-tokens (both paths) [default: the server's]: prompts "
        "up to this long, prefilled alone, replay a captured graph; 0: every prefill eager",
    )
    parser.add_argument(
        "--front-ends",
        type=positive_int,
        default=1,
        help="the server's --front-ends with the engine in its own process [default 1]",
    )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=1,
        help="gRPC connections of the client, request c of a burst (or client c) through c mod N [default 1]",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--telemetry-target", default="", help="the server's sidecar address [default: none]")
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth test's copy")
    parser.add_argument(
        "--timeout-s", type=float, default=300.0, help="per request (a stuck run fails, not hangs)"
    )
    parser.add_argument("--server-start-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip every block that would start after this many seconds",
    )
    parser.add_argument("--append", action="store_true", help="merge into an existing --out file")
    parser.add_argument("--out", type=Path, default=Path("bench/out/service_decode.json"))
    args = parser.parse_args(argv)
    for name in ("new_tokens", "batch1_repeats", "burst_rounds", "requests_per_client"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not 0 <= args.k <= 8:
        parser.error("--warmup must be >= 0 and -k in [0, 8]")
    if args.requests_per_client == 1 and "sustained" in args.modes:
        parser.error("--requests-per-client must be >= 2 for a sustained steady window")
    return args


def model_dirs(args: argparse.Namespace, size: str) -> tuple[Path, Path | None]:
    if size == "model":  # --model: a directory given as it is
        draft = args.draft_model_dir if "draft_model" in args.methods else None
        return args.model, draft
    target_shape, draft_shape = SIZES[size]
    if "draft_model" not in args.methods:
        draft_shape = None
    dirs = []
    for shape in (target_shape, draft_shape):
        if shape is None:
            dirs.append(None)
            continue
        path = args.models_dir / shape
        if not (path / "config.json").is_file():
            if not args.write_missing:
                raise SystemExit(
                    f"no model at {path}: write it with `python -m bench.random_model --shape {shape} "
                    f"--out {path}` (or pass --write-missing)"
                )
            from bench.random_model import smollm2_tokenizer, write_random_model

            device = (
                args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            )
            write_random_model(path, shape, smollm2_tokenizer(), device=device, log=log)
        dirs.append(path)
    return dirs[0], dirs[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    # Under `timeout`: SIGTERM unwinds like an exception, so the server child is stopped
    # and the JSON keeps every block measured so far.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    prompt_sets = {spec: load_prompts(spec) for spec in args.prompts}
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    result: dict[str, Any] = {}
    if args.append and args.out.exists():
        result = json.loads(args.out.read_text())
    import transformers

    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    )
    run = {
        "command": " ".join([sys.executable, "-m", "bench.service_decode", *(argv or sys.argv[1:])]),
        "machine": machine,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    result.setdefault("runs", []).append(run)
    rows: list[dict] = result.setdefault("rows", [])
    budget = Budget(args.budget_s, _T0, log)

    def save() -> None:
        run["skipped"] = budget.skipped
        run["elapsed_seconds"] = time.perf_counter() - _T0
        result["summary"] = {
            f"run {i}": summary_table([r for r in rows if r["run"] == i])
            for i in range(len(result["runs"]))
            if any(r["run"] == i for r in rows)
        }
        write_result(args.out, result)

    def add_row(row: dict) -> None:
        row["run"] = len(result["runs"]) - 1
        rows.append(row)
        log(line_of(row))
        save()

    log(f"measuring the copy bandwidth of {device} ({args.copy_gib:g} GiB)")
    run["bandwidth"] = copy_bandwidth(device, int(args.copy_gib * 2**30))
    log(f"copy bandwidth {run['bandwidth']['bytes_per_s'] / 1e12:.3f} TB/s")
    save()
    for size in ["model"] if args.model is not None else args.sizes:
        target, draft = model_dirs(args, size)
        methods = [m for m in args.methods if m != "draft_model" or draft is not None]
        weight_bytes = checkpoint_weight_bytes(target)
        roofline = roofline_tokens_per_s(weight_bytes, run["bandwidth"]["bytes_per_s"])
        config_args = server_args(args, target, draft)
        info = run.setdefault("sizes", {}).setdefault(
            size,
            {
                "target": str(target),
                "draft": None if draft is None else str(draft),
                "target_weight_bytes": weight_bytes,
                "draft_weight_bytes": None if draft is None else checkpoint_weight_bytes(draft),
                "roofline_tokens_per_s": roofline,
                "server_args": config_args,
                "methods": methods,
                "paths": {},
            },
        )
        log(
            f"{size}: target {target} ({weight_bytes / 1e9:.2f} GB, roofline {roofline:.1f} tok/s), "
            f"draft {draft}"
        )
        plan = blocks(args, prompt_sets, methods)
        for path, measure in measurements(args):
            if not budget.allows(f"{size} {path} start"):
                continue
            measure(
                args,
                size,
                config_args,
                plan,
                prompt_sets,
                roofline,
                add_row,
                budget,
                info["paths"].setdefault(path, {}),
            )
            save()
    save()
    print(format_table([r for r in rows if r["run"] == len(result["runs"]) - 1]), flush=True)
    if budget.skipped:
        print(f"skipped (time budget): {len(budget.skipped)} blocks, listed in the JSON", flush=True)
    print(f"wrote {args.out}", flush=True)
    failed = sum(r["requests_failed"] for r in rows)
    return 1 if failed else 0


# ---------------------------------------------------------------------------- output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def line_of(row: dict) -> str:
    roof = ""
    if "roofline_tokens_per_s" in row:
        fraction = _fmt(row["fraction_of_roofline"], ".0%")
        roof = f"  roofline {_fmt(row['roofline_tokens_per_s'], '.0f')} ({fraction})"
    return (
        f"{row['size']} {row['path']:9s} {row['prompts']:18s} {row['method']:11s} {row['mode']:9s} "
        f"{row['level']:3d}: {_fmt(row['tokens_per_s'], '8.1f')} tok/s  ttft p50/p99 "
        f"{_fmt(row['ttft_p50_ms'], '.1f')}/{_fmt(row['ttft_p99_ms'], '.1f')} ms  itl p50/p99 "
        f"{_fmt(row['itl_p50_ms'], '.1f')}/{_fmt(row['itl_p99_ms'], '.1f')} ms  accept "
        f"{_fmt(row['accept_rate'], '.2f')}{roof}"
        + (f"  FAILED {row['requests_failed']}" if row["requests_failed"] else "")
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join(
        line_of(r)
        for r in sorted(
            rows,
            key=lambda r: (
                r["size"],
                r["prompts"],
                MODES.index(r["mode"]),
                r["level"],
                r["method"],
                r["path"],
            ),
        )
    )


def summary_table(rows: list[dict]) -> dict[str, float | None]:
    """Flat figures of one run's rows: tokens/s per row, gRPC / in-process and method / plain."""
    table: dict[str, float | None] = {}
    by_key = {row_key(r): r for r in rows}
    for key, r in sorted(by_key.items(), key=lambda kv: tuple(map(str, kv[0]))):
        size, path, spec, method, mode, level = key
        name = f"{size} {spec} {mode} {level} {method}"
        table[f"{name} {path} tok/s"] = r["tokens_per_s"]
        other = by_key.get((size, "inprocess", spec, method, mode, level))
        if path.startswith("grpc") and other and other["tokens_per_s"] and r["tokens_per_s"]:
            table[f"{name} {path}/inprocess"] = r["tokens_per_s"] / other["tokens_per_s"]
        plain = by_key.get((size, path, spec, "none", mode, level))
        if method != "none" and plain and plain["tokens_per_s"] and r["tokens_per_s"]:
            table[f"{size} {spec} {mode} {level} {path} {method}/plain"] = (
                r["tokens_per_s"] / plain["tokens_per_s"]
            )
    return table


if __name__ == "__main__":
    raise SystemExit(main())
