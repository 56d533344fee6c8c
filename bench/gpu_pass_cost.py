"""Cost of one forward pass on the GPU, by path and shape, plus the speedup it predicts.

    python -m bench.gpu_pass_cost --model smollm2-135m-instruct
    python -m bench.gpu_pass_cost --shape llama8b --draft-shape llama1b   # random weights
    python -m bench.gpu_pass_cost --shape smollm2-135m --paths graph_compiled \
        --variants around_attention,layer --profile --out bench/out/variants.json

Times (CUDA events, median of --iters) a pass of B rows x T new tokens against a KV cache
holding --context tokens per row: transformers' own forward (eager, the reference path),
our lean forward eager, replayed from a CUDA graph, and graph + torch.compile fusion.
The lean paths run once per --variants entry (ModelForward's variant: what one compiled
region covers), side by side in one run; for each, the wall time of the first pass of every
shape (compile + warm-up + graph capture) is reported. With --profile, one replay of the
graph of each --profile-shapes shape (default B=1, T=1) of each graphed path and variant runs
under torch.profiler: the number of kernels and the top kernels by GPU time go to the JSON
(and the terminal).
With a draft shape, also prints the speedup that the measured costs predict for a given
acceptance rate a: tokens per pass (1 - a^(k+1)) / (1 - a) over the pass time
(verify(k) + k * draft) / plain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bench.common.arguments import add_gemv_max_rows, gemv_rows_text
from bench.common.cuda_timing import time_ms
from bench.common.model_shapes import LLAMA_3_1_8B, LLAMA_3_2_1B, SMOLLM2_135M
from service.engine.execution.linear_blocks import DEFAULT_TABLE, BlockTable, table_document, table_for
from service.engine.execution.runner import ModelRunner
from service.models.loading import LoadedModel, load_model

SHAPES = {  # Llama 3.1 8B, Llama 3.2 1B, and SmolLM2-135M's shape (pass costs without its weights)
    "llama8b": dict(**LLAMA_3_1_8B, vocab_size=128256),
    "llama1b": dict(**LLAMA_3_2_1B, vocab_size=128256),
    "smollm2-135m": dict(**SMOLLM2_135M, vocab_size=49152, rms_norm_eps=1e-5),
}
LEAN_PATHS = ("lean_eager", "graph", "graph_compiled")  # the paths that run once per variant


def random_model(shape: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.model.rotary_emb.__init__(config, device="cuda")  # buffers were on meta
    return LoadedModel(shape, model.eval(), None, torch.device("cuda"), dtype)


def measure(
    loaded: LoadedModel,
    batches: list[int],
    widths: list[int],
    context: int,
    iters: int,
    paths: list[str],
    variants: list[str],
    profile: bool = False,
    setup: list[dict] | None = None,
    profiles: list[dict] | None = None,
    profile_shapes: tuple[tuple[int, int], ...] = ((1, 1),),
    linear_blocks: BlockTable = DEFAULT_TABLE,
    gemv_max_rows: int | None = None,
) -> list[dict]:
    """Rows {path, variant, batch, width, context, ms, first_s}; first_s is the wall time of the
    first pass of that shape (for graphed paths: compile, warm-up and capture). Appends one
    {path, variant, seconds, ...} per runner to `setup` and, with `profile`, one kernel
    listing per graphed runner to `profiles`."""
    rows = []
    max_batch, max_width = max(batches), max(widths)
    max_len = context + max_width + 1
    runners = {
        "transformers": lambda variant: ModelRunner(loaded, max_batch, max_len, max_width, use_lean=False),
        "lean_eager": lambda variant: ModelRunner(
            loaded,
            max_batch,
            max_len,
            max_width,
            use_graphs=False,
            use_compile=False,
            lean_variant=variant,
            linear_blocks=linear_blocks,
            gemv_max_rows=gemv_max_rows,
        ),
        "graph": lambda variant: ModelRunner(
            loaded,
            max_batch,
            max_len,
            max_width,
            use_compile=False,
            lean_variant=variant,
            linear_blocks=linear_blocks,
            gemv_max_rows=gemv_max_rows,
        ),
        "graph_compiled": lambda variant: ModelRunner(
            loaded,
            max_batch,
            max_len,
            max_width,
            lean_variant=variant,
            linear_blocks=linear_blocks,
            gemv_max_rows=gemv_max_rows,
        ),
    }
    vocab = loaded.vocab_size
    for path in paths:
        for variant in variants if path in LEAN_PATHS else [None]:
            label = path if variant is None else f"{path}[{variant}]"
            started = time.perf_counter()
            runner = runners[path](variant)
            first_total = 0.0
            for batch in batches:
                for width in widths:
                    ids = torch.randint(0, vocab, (batch, width), device="cuda")
                    starts = [context] * batch
                    with torch.inference_mode():
                        torch.cuda.synchronize()
                        first = time.perf_counter()
                        runner.forward(0, batch, ids, starts)
                        torch.cuda.synchronize()
                        first = time.perf_counter() - first
                        ms = time_ms(lambda: runner.forward(0, batch, ids, starts), iters)  # noqa: B023
                    first_total += first
                    rows.append(
                        {
                            "path": path,
                            "variant": variant,
                            "batch": batch,
                            "width": width,
                            "context": context,
                            "ms": ms,
                            "first_s": round(first, 3),
                        }
                    )
                    print(
                        f"{loaded.name:24s} {label:34s} B={batch:3d} T={width} {ms:8.3f} ms"
                        f"  (first pass {first:6.2f} s)",
                        flush=True,
                    )
            lean = runner.lean
            entry = {
                "path": path,
                "variant": variant,
                "seconds": round(time.perf_counter() - started, 2),
                "first_passes_s": round(first_total, 2),
                "graphs_captured": runner.captures,
                "compiled_layer_specialisations": lean.compiled_graphs() if lean is not None else 0,
                "gemv_max_rows": lean.gemv_max_rows if lean is not None else None,  # as resolved
            }
            print(
                f"{loaded.name:24s} {label:34s} setup {entry['seconds']:.1f} s, first passes "
                f"{first_total:.1f} s, {runner.captures} graphs, "
                f"{entry['compiled_layer_specialisations']} compiled layer specialisations",
                flush=True,
            )
            if setup is not None:
                setup.append(entry)
            if profile and runner.graphs is not None and profiles is not None:
                for batch, width in profile_shapes:
                    profiles.append(profile_replay(runner, context, path, variant, batch, width))
            runner = None  # frees its buffers before the next path
            torch.cuda.empty_cache()
    return rows


def profile_replay(
    runner: ModelRunner,
    context: int,
    path: str,
    variant: str | None,
    batch: int = 1,
    width: int = 1,
    top: int = 15,
) -> dict:
    """Kernels of one replay of the B x T graph (captured on first use), by torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = torch.zeros((batch, width), dtype=torch.long, device="cuda")
    with torch.inference_mode():
        runner.forward(0, batch, ids, [context] * batch)  # captures the graph if the timed shapes did not
    graph = runner.graphs.graphs[runner.graphs.buckets(batch, width, context)]
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset"))]
    by_name: Counter = Counter()
    calls: Counter = Counter()
    for e in kernels:
        by_name[e.name] += e.time_range.elapsed_us()
        calls[e.name] += 1
    span_us = (
        (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) if events else 0.0
    )
    result = {
        "path": path,
        "variant": variant,
        "batch": batch,
        "width": width,
        "context": context,
        "kernels": len(kernels),
        "other_device_events": len(events) - len(kernels),
        "kernel_us": round(sum(by_name.values()), 1),
        "span_us": round(span_us, 1),
        "top": [
            {"name": name[:160], "us": round(us, 1), "calls": calls[name]}
            for name, us in by_name.most_common(top)
        ],
    }
    label = path if variant is None else f"{path}[{variant}]"
    print(
        f"profile {label} B={batch} T={width}: {result['kernels']} kernels "
        f"({result['other_device_events']} other device events), "
        f"kernel time {result['kernel_us']:.0f} us, span {result['span_us']:.0f} us",
        flush=True,
    )
    for item in result["top"][:8]:
        print(f"    {item['us']:8.1f} us {item['calls']:4d}x  {item['name'][:100]}", flush=True)
    if not kernels:
        raise RuntimeError("the profiler saw no kernels in the graph replay")
    return result


def side_by_side(rows: list[dict], variants: list[str]) -> list[dict]:
    """ms per variant for each (path, batch, width) a lean path measured in several variants."""
    table = []
    keys = sorted(
        {(r["path"], r["batch"], r["width"]) for r in rows if r["variant"] is not None},
        key=lambda k: (LEAN_PATHS.index(k[0]), k[1], k[2]),
    )
    for path, batch, width in keys:
        ms = {
            r["variant"]: r["ms"]
            for r in rows
            if (r["path"], r["batch"], r["width"]) == (path, batch, width) and r["variant"] is not None
        }
        table.append({"path": path, "batch": batch, "width": width, "ms": ms})
    if len(variants) > 1 and table:
        print(
            f"\n{'path':15s} {'B':>3s} {'T':>2s} "
            + " ".join(f"{v:>17s}" for v in variants)
            + f"  {variants[-1]}/{variants[0]}"
        )
        for entry in table:
            cells = " ".join(f"{entry['ms'].get(v, float('nan')):14.3f} ms" for v in variants)
            ratio = entry["ms"].get(variants[-1], float("nan")) / entry["ms"].get(variants[0], float("nan"))
            print(f"{entry['path']:15s} {entry['batch']:3d} {entry['width']:2d} {cells}  {ratio:.3f}")
    return table


def expected_tokens(accept: float, k: int) -> float:
    """Tokens a pass of k drafts yields when each is accepted with probability `accept` given
    the ones before it were: 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) (k + 1 at a = 1)."""
    return float(k + 1) if accept >= 1.0 else (1 - accept ** (k + 1)) / (1 - accept)


def predicted_speedup(
    target_rows, draft_rows, batch: int, accept: float, k: int, variant: str, path: str = "graph_compiled"
) -> float:
    """Tokens per pass over the pass's cost, (verify(k) + k * draft) / plain, from measured rows."""
    cost = {
        (r["batch"], r["width"]): r["ms"]
        for r in target_rows
        if r["path"] == path and r["variant"] == variant
    }
    draft = {
        (r["batch"], r["width"]): r["ms"] for r in draft_rows if r["path"] == path and r["variant"] == variant
    }
    return expected_tokens(accept, k) * cost[(batch, 1)] / (cost[(batch, k + 1)] + k * draft[(batch, 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model load_model() knows (real weights)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight shape instead")
    parser.add_argument("--draft-shape", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--widths", default="1,2,3,4,5,6,7,8,9")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--paths", default="transformers,lean_eager,graph,graph_compiled")
    parser.add_argument(
        "--variants",
        default="around_attention",
        help="comma-separated ModelForward variants for the lean paths "
        "(around_attention, layer); each runs in this process, side by side",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one replay of a captured graph per graphed path and variant (--profile-shapes)",
    )
    parser.add_argument(
        "--profile-shapes",
        default="1:1",
        help="comma-separated BATCH:WIDTH shapes that --profile replays, e.g. 1:1,32:1,32:2",
    )
    parser.add_argument(
        "--linear-blocks",
        type=Path,
        help="a JSON table of the invariant kernels' block shapes over the committed one "
        "(service/engine/execution/linear_blocks.py)",
    )
    add_gemv_max_rows(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from service.engine.execution.model_forward import VARIANTS

    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    paths = args.paths.split(",")
    variants = args.variants.split(",")
    for name in paths:
        if name not in ("transformers", *LEAN_PATHS):
            parser.error(f"unknown path {name!r}")
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    if not torch.cuda.is_available():
        sys.exit("gpu_pass_cost.py needs CUDA")
    if not (args.model or args.shape):
        parser.error("give --model or --shape")
    linear_blocks = table_for(args.linear_blocks)  # a bad file fails before the load
    loaded = (
        load_model(args.model, dtype=dtype, device="cuda") if args.model else random_model(args.shape, dtype)
    )
    setup: list[dict] = []
    profiles: list[dict] = []
    result = {
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "target": loaded.name,
        "variants": variants,
        "gemv_max_rows": gemv_rows_text(args.gemv_max_rows),
        "linear_blocks": {
            "file": str(args.linear_blocks) if args.linear_blocks else None,
            "table": table_document(linear_blocks)["entries"],
        },
        "rows": measure(
            loaded,
            batches,
            widths,
            args.context,
            args.iters,
            paths,
            variants,
            args.profile,
            setup,
            profiles,
            tuple(tuple(int(n) for n in shape.split(":")) for shape in args.profile_shapes.split(",")),
            linear_blocks,
            args.gemv_max_rows,
        ),
    }
    result["setup"] = setup
    result["side_by_side"] = side_by_side(result["rows"], variants)
    if args.profile:
        result["profiles"] = profiles
    if args.draft_shape:
        del loaded
        torch.cuda.empty_cache()
        draft = random_model(args.draft_shape, dtype)
        result["draft"] = draft.name
        result["draft_rows"] = measure(
            draft,
            batches,
            [1],
            args.context,
            args.iters,
            ["graph_compiled"],
            variants,
            linear_blocks=linear_blocks,
            gemv_max_rows=args.gemv_max_rows,
        )
        table = []
        for variant in variants:
            for batch in batches:
                for accept in (0.5, 0.6, 0.7, 0.8, 0.9):

                    def speedup(k: int, batch=batch, accept=accept, variant=variant) -> float:
                        return predicted_speedup(
                            result["rows"],
                            result["draft_rows"],
                            batch,
                            accept,
                            k,
                            variant,
                        )

                    best = max(range(1, max(widths)), key=speedup)
                    speedups = {k: round(speedup(k), 3) for k in range(1, max(widths))}
                    table.append(
                        {
                            "variant": variant,
                            "batch": batch,
                            "accept_rate": accept,
                            "best_k": best,
                            "speedup_by_k": speedups,
                        }
                    )
                    print(
                        f"predicted [{variant}] B={batch:3d} a={accept:.1f}: best k={best} "
                        f"speedup {speedups[best]:.2f}x  {speedups}"
                    )
        result["predicted"] = table
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
