"""Block shapes of the row-invariant linear kernels at 1B and 8B weight shapes (GPU only).

    python -m bench.diagnostics.linear_blocks --out bench/out/linear_blocks.json \
        --table-out bench/out/linear_blocks_table.json

For each linear of a Llama-3.1-8B layer (and the 1B draft's, with --shapes), each row count
and each candidate block shape: the kernel's time (median of CUDA-graph replays of 10
calls, so launch overhead is not measured), the weight-read floor (weight bytes / the
device's measured copy bandwidth, same run) and whether a row's output bits are the same
alone and among many rows (the kernels' promise, service/engine/execution/invariant_kernels.py).
Calls take the forms the engine's forward makes: the norm prologue for qkv, gate/up and the
LM head, the gated prologue and a residual for down, a residual for o.

Each weight shape's candidates are its current block shapes (DEFAULT_TABLE's, else the
defaults) and TILES, SPLIT_TILES (the inner dimension in fixed ranges) / GEMVS. With
--table-out, a block table for --linear-blocks / SPECDEC_LINEAR_BLOCKS
(service/engine/execution/linear_blocks.py): per weight shape and kernel, the invariant
candidate with the least mean ratio of its time to the current blocks' over that kernel's
row counts, where that ratio is below 1 - MIN_GAIN (any invariant candidate where the
current blocks are not invariant; the least summed time where they failed to run); what was
compared goes under "evidence". The sweep exits non-zero when a weight's current blocks are
not invariant (or cannot run) and no candidate is. Block shapes are chosen from the weight's
shape, never from the row count, so a row's bits stay independent of the rest of the pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.common.arguments import write_result
from bench.common.roofline import copy_bandwidth
from service.engine.execution.linear_blocks import (
    DEFAULT_TABLE,
    KINDS,
    BlockTable,
    GemvBlocks,
    TileBlocks,
    table_document,
)

# (name, N, K, call form) per shape; N of qkv and gate/up are the fused weights'; the LM head's
# N is bench.random_model's vocabulary (SmolLM2's tokenizer, 49,152), not Llama 3's 128,256.
SHAPES = {
    "llama8b": [
        ("qkv", 6144, 4096, "norm"),
        ("o", 4096, 4096, "residual"),
        ("gate_up", 28672, 4096, "norm"),
        ("down", 4096, 14336, "gated"),
        ("lm_head", 49152, 4096, "head"),
    ],
    "llama1b": [
        ("qkv", 3072, 2048, "norm"),
        ("o", 2048, 2048, "residual"),
        ("gate_up", 16384, 2048, "norm"),
        ("down", 2048, 8192, "gated"),
        ("lm_head", 49152, 2048, "head"),
    ],
}

TILES = [  # (BM, BN, BK, warps, stages); the first is TILE_BLOCKS
    (16, 64, 64, 4, 3),
    # BN = 32: at 32 rows an N = 4096 weight (o, down) has 64 column tiles of BN = 64, fewer
    # programs than an H100's 132 SMs.
    (16, 32, 128, 4, 4),
    (32, 32, 128, 4, 4),
    (16, 32, 256, 4, 3),
    (32, 64, 128, 4, 4),
    (32, 64, 256, 4, 3),
    (16, 128, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 128, 128, 8, 3),
    (16, 256, 64, 4, 3),
    (32, 64, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (32, 128, 128, 4, 3),
    (32, 128, 128, 8, 3),
    (32, 256, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (64, 128, 128, 8, 3),
    (64, 256, 64, 8, 3),
]
# The inner dimension split in fixed ranges (TileBlocks.split): up to 64 rows (one row tile
# of BM = 64) an N = 4096 weight has 16 to 64 column tiles, a third to an eighth of an H100's
# SMs, and qkv (N = 6144) and gate/up (N = 28672) in wide tiles 48 and 112, each program
# reading a long stretch of K; split ranges multiply the programs.
SPLIT_TILES = [
    (bm, bn, bk, warps, stages, split)
    for bm, bn, bk, warps, stages in [
        (16, 64, 64, 4, 3),
        (16, 64, 128, 4, 4),
        (16, 128, 64, 4, 4),
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (16, 256, 64, 4, 3),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (64, 256, 64, 8, 3),
    ]
    for split in (2, 4, 8)
]
GEMVS = [  # (BN, BK, warps); the first is GEMV_BLOCKS
    (4, 256, 4),
    (8, 256, 4),
    (4, 512, 4),
    (8, 512, 4),
    (16, 256, 4),
    (8, 256, 8),
    (16, 512, 8),
    (4, 1024, 4),
    (2, 512, 4),
    (8, 1024, 8),
]
# Batch-1 decode and 9-token verify, batch-16 decode (the tile kernel serves every pass of
# the 8B shape: EngineConfig.gemv_max_rows auto), then B = 32 at T = 1, 2, 4, 9.
TILE_ROWS = (1, 9, 16, 32, 64, 128, 288)
GEMV_ROWS = (1, 5, 9)  # batch 1 decode and verify passes
MIN_GAIN = 0.02  # a candidate replaces the current blocks only if it takes more than this much less time


class Case:
    """The tensors of one linear call of a given form, for up to `rows` rows."""

    def __init__(self, n: int, k: int, form: str, rows: int) -> None:
        from service.engine.execution import invariant_kernels  # Triton: CUDA machines only

        self.linear = invariant_kernels.linear
        gen = torch.Generator(device="cuda").manual_seed(n + k)
        width = 2 * k if form == "gated" else k
        self.form = form
        self.x = (torch.randn(rows, width, device="cuda", generator=gen) * 2).bfloat16()
        self.w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
        self.norm = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).bfloat16()
        self.res = torch.randn(rows, n, device="cuda", generator=gen).bfloat16()

    def call(self, m: int, **blocks) -> torch.Tensor:
        x, linear = self.x[:m], self.linear
        if self.form == "norm":
            return linear(x, self.w, norm=self.norm, eps=1e-5, **blocks)
        if self.form == "head":
            return linear(x, self.w, norm=self.norm, eps=1e-5, out_float32=True, **blocks)
        if self.form == "gated":
            return linear(x, self.w, gated=True, residual=self.res[:m], **blocks)
        return linear(x, self.w, residual=self.res[:m], **blocks)


def graph_ms(fn, calls: int = 10, iters: int = 20) -> float:
    """Median milliseconds of one fn() call, replaying a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def invariant_tiles(case: Case, tiles: TileBlocks) -> bool:
    """Row 0 alone equals row 0 of a 9-row call, and row 5 of a 17-row call equals the same
    row at position 200 of a 288-row call (the tile kernel whatever the row count)."""

    def call(m: int) -> torch.Tensor:
        return case.call(m, tiles=tiles, gemv_max_rows=0)

    if not torch.equal(call(1)[0], call(9)[0]):
        return False
    saved = case.x[200].clone()
    case.x[200] = case.x[5]
    if case.form in ("gated", "residual"):
        saved_res = case.res[200].clone()
        case.res[200] = case.res[5]
    try:
        few, many = call(17)[5], call(288)[200]
        return bool(torch.equal(few, many))
    finally:
        case.x[200] = saved
        if case.form in ("gated", "residual"):
            case.res[200] = saved_res


def invariant_gemv(case: Case, gemv: GemvBlocks) -> bool:
    """Row 0 alone equals row 0 of a 9-row call."""
    return bool(torch.equal(case.call(1, gemv=gemv)[0], case.call(9, gemv=gemv)[0]))


def bound(case: Case, m: int, blocks: dict):
    """A call of the kernel `blocks` names (tiles: gemv limit 0; gemv: up to 16 rows)."""
    limit = 0 if "tiles" in blocks else max(GEMV_ROWS)
    return lambda: case.call(m, gemv_max_rows=limit, **blocks)


def candidates_for(
    n: int, k: int, kernels: list[str], current: BlockTable, tiles_from: str = "all"
) -> list[tuple]:
    """(kind, blocks, row counts) to measure for a weight [N, K]: its current blocks first.
    tiles_from: "all" (TILES and SPLIT_TILES), "split" (SPLIT_TILES only)."""
    gemv, tiles = current.for_weight(n, k)
    out = []
    if "tiles" in kernels:
        pool = (TILES if tiles_from == "all" else []) + SPLIT_TILES
        shapes = dict.fromkeys([tiles, *(TileBlocks(*c) for c in pool)])  # in order, once each
        out += [("tiles", blocks, TILE_ROWS) for blocks in shapes]
    if "gemv" in kernels:
        shapes = dict.fromkeys([gemv, *(GemvBlocks(*c) for c in GEMVS)])
        out += [("gemv", blocks, GEMV_ROWS) for blocks in shapes]
    return out


# Outcomes that leave a weight on blocks that break the engine: the sweep exits non-zero.
NOT_RUNNABLE = "current blocks failed to run; no candidate ran invariant"
NOT_INVARIANT = "current blocks not invariant; no invariant candidate"


def choose_table(
    rows: list[dict], current: BlockTable, min_gain: float = MIN_GAIN
) -> tuple[BlockTable, list[dict]]:
    """The block table a sweep's `rows` (main's result["rows"]) call for, and the evidence.

    Per weight shape (n, k) and kernel, a candidate is compared with the current blocks
    (`current.for_weight`) at every point both were measured at (each linear of that shape at
    each of the kernel's row counts): its cost is the mean over the points of its time over
    the current blocks' time, so that a batch-32 decode pass counts as much as a 288-row
    verify pass, which takes several times longer. A candidate counts only if every
    measurement ran and was invariant and it covers the same points as the current blocks.
    The cheapest goes into the table when its cost is below 1 - min_gain, or when the current
    blocks were measured not invariant. Evidence: one record per (n, k, kernel) compared.
    """
    measured: dict[tuple, list[dict]] = defaultdict(list)  # (n, k, kind, blocks) -> rows
    for row in rows:
        if "n" in row:
            blocks = KINDS[row["kind"]](**row["blocks"])
            measured[row["n"], row["k"], row["kind"], blocks].append(row)

    def times(found: list[dict], invariant_only: bool = True) -> dict[tuple[str, str], float] | None:
        """ms per (linear, row count), or None if a call failed (or was not invariant)."""
        if any("error" in r or (invariant_only and not r["invariant"]) for r in found):
            return None
        return {(r["linear"], m): t for r in found for m, t in r["ms"].items()}

    chosen: dict[tuple[int, int], dict[str, Any]] = defaultdict(dict)
    evidence = []
    for n, k, kind in sorted({key[:3] for key in measured}):
        now = current.for_weight(n, k)[0 if kind == "gemv" else 1]
        record: dict[str, Any] = {"n": n, "k": k, "kind": kind, "current": dataclasses.asdict(now)}
        evidence.append(record)
        if (n, k, kind, now) not in measured:
            record["outcome"] = "current blocks not measured"
            continue
        now_found = measured[n, k, kind, now]
        now_times = times(now_found, invariant_only=False)
        if now_times is None:  # the engine could not run this weight: any invariant candidate will do
            ran = {
                blocks: t
                for (n2, k2, kind2, blocks), found in measured.items()
                if (n2, k2, kind2) == (n, k, kind) and (t := times(found)) is not None
            }
            if not ran:
                record["outcome"] = NOT_RUNNABLE
                continue
            points = max((t.keys() for t in ran.values()), key=len)
            best = min((b for b, t in ran.items() if t.keys() == points), key=lambda b: sum(ran[b].values()))
            chosen[n, k][kind] = best
            record.update(fastest=dataclasses.asdict(best), fastest_ms=round(sum(ran[best].values()), 4))
            record["outcome"] = "chosen: the current blocks failed to run"
            continue
        now_invariant = all(r["invariant"] for r in now_found)
        relative = {
            blocks: statistics.fmean(t[p] / now_times[p] for p in now_times)
            for (n2, k2, kind2, blocks), found in measured.items()
            if (n2, k2, kind2) == (n, k, kind)
            and (t := times(found)) is not None
            and t.keys() == now_times.keys()
        }
        record.update(current_ms=round(sum(now_times.values()), 4), current_invariant=now_invariant)
        if not relative:
            record["outcome"] = "no invariant candidate" if now_invariant else NOT_INVARIANT
            continue
        best = min(relative, key=relative.__getitem__)
        best_ms = sum(times(measured[n, k, kind, best]).values())
        record.update(
            fastest=dataclasses.asdict(best),
            fastest_ms=round(best_ms, 4),
            fastest_relative=round(relative[best], 4),
        )
        if best != now and (not now_invariant or relative[best] < 1 - min_gain):
            chosen[n, k][kind] = best
            record["outcome"] = "chosen"
        else:
            record["outcome"] = "current kept"
    table = BlockTable({shape: (kinds.get("gemv"), kinds.get("tiles")) for shape, kinds in chosen.items()})
    return table, evidence


def table_file(result: dict, current: BlockTable) -> dict:
    """The --table-out document of a sweep's result: choose_table's entries, its evidence."""
    table, weights = choose_table(result["rows"], current)
    evidence = {
        "about": "what bench.diagnostics.linear_blocks measured to choose the entries; "
        "ms: summed over the kernel's row counts; relative: the mean over those of the time "
        "over the current blocks' (what decides); the loader ignores this key",
        "device": result["device"],
        "command": result["command"],
        "min_gain": MIN_GAIN,
        "weights": weights,
    }
    return table_document(table, evidence)


@torch.inference_mode()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="llama8b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--kernels", default="tiles,gemv")
    parser.add_argument(
        "--linears", default="", help="comma-separated subset of qkv, o, gate_up, down, lm_head [all]"
    )
    parser.add_argument(
        "--tiles-from",
        choices=("all", "split"),
        default="all",
        help="tile candidates: TILES and SPLIT_TILES, or SPLIT_TILES only (and the current blocks)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/linear_blocks.json"))
    parser.add_argument(
        "--table-out",
        type=Path,
        default=None,
        help="also write the block table the sweep calls for (a file for --linear-blocks)",
    )
    args = parser.parse_args(argv)
    known = {name for shape in args.shapes.split(",") for name, *_ in SHAPES.get(shape, [])}
    unknown = sorted(set(filter(None, args.linears.split(","))) - known)
    if unknown:
        parser.error(f"--linears: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    bandwidth = copy_bandwidth(torch.device("cuda"), 1 << 30)["bytes_per_s"]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(["python -m bench.diagnostics.linear_blocks", *sys.argv[1:]]),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "rows": [],
    }
    print(result["device"], f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    kernels = args.kernels.split(",")
    for shape in args.shapes.split(","):
        for name, n, k, form in SHAPES[shape]:
            if args.linears and name not in args.linears.split(","):
                continue
            case = Case(n, k, form, max(TILE_ROWS))
            floor_ms = n * k * 2 / bandwidth * 1e3
            for kind, blocks, row_counts in candidates_for(n, k, kernels, DEFAULT_TABLE, args.tiles_from):
                started = time.perf_counter()
                try:
                    same = (invariant_tiles if kind == "tiles" else invariant_gemv)(case, blocks)
                    times = {m: graph_ms(bound(case, m, {kind: blocks})) for m in row_counts}
                except Exception as exc:  # noqa: BLE001 - a shape the kernel cannot take: recorded
                    print(shape, name, blocks, "failed:", repr(exc)[:200], flush=True)
                    result["rows"].append(
                        {
                            "shape": shape,
                            "linear": name,
                            "n": n,
                            "k": k,
                            "kind": kind,
                            "blocks": dataclasses.asdict(blocks),
                            "error": repr(exc),
                        }
                    )
                    continue
                row = {
                    "shape": shape,
                    "linear": name,
                    "n": n,
                    "k": k,
                    "kind": kind,
                    "blocks": dataclasses.asdict(blocks),
                    "invariant": same,
                    "floor_ms": round(floor_ms, 4),
                    "ms": {str(m): round(t, 4) for m, t in times.items()},
                    "seconds": round(time.perf_counter() - started, 1),
                }
                result["rows"].append(row)
                print(
                    shape,
                    name,
                    kind,
                    tuple(dataclasses.astuple(blocks)),
                    "invariant" if same else "NOT INVARIANT",
                    " ".join(f"M{m}={t * 1e3:.0f}us({floor_ms / t:.0%})" for m, t in times.items()),
                    flush=True,
                )
            write_result(args.out, result)
            if args.table_out is not None:  # after each linear: a cut-short sweep keeps its table
                document = table_file(result, DEFAULT_TABLE)
                write_result(args.table_out, document)
                print(f"table: {len(document['entries'])} weight shapes -> {args.table_out}", flush=True)
    _, evidence = choose_table(result["rows"], DEFAULT_TABLE)
    broken = [e for e in evidence if e["outcome"] in (NOT_RUNNABLE, NOT_INVARIANT)]
    for e in broken:
        print(f"WARNING n={e['n']} k={e['k']} {e['kind']}: {e['outcome']}", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
