"""Host time a model runner's captured passes take to launch: from the forward's call to its
return, with the device idle before each call (CUDA only).

    python -m bench.diagnostics.launch_cost --model DIR            # bf16 weights of DIR
    cd OTHER_CHECKOUT && python -m bench.diagnostics.launch_cost --model DIR   # other code, same machine

A captured pass returns as soon as its graph is queued, so the call's wall time is host
work the device waits for when a pass starts from an idle device (a batch-1 decode pass
after its verdicts reached the host; a request's prefill): the inputs' uploads, the
bucket lookup, the replay's launch. Measured for decode/verify passes at the given batch
sizes and widths (ModelRunner.forward with device-resident ids, as a decode pass gives
them) and for one-row prefills of the given prompt lengths (the captured prefill graphs,
whose call also queues the copy of the logits out of the graph's buffer). The output says
whether the runner had its decode and prefill graphs (without them the passes run eagerly,
and the figures are not launches of captured graphs).

With --uploads it also times the two ways host values reach the device in this tree, on
the same lists: execution.device.to_device (a fresh pinned block from torch's caching host
allocator per call) and execution.staging.UploadStaging (one persistent pinned buffer, as a
decode pass uploads its inputs), each call's time from the call to its return (the copy is
queued, not waited for). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.common.arguments import positive_ints, write_result
from service.engine.execution.runner import ModelRunner
from service.models.loading import load_model


def _percentiles(samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)
    return {
        "p50_us": round(statistics.median(ordered), 2),
        "p10_us": round(ordered[len(ordered) // 10], 2),
        "p90_us": round(ordered[(9 * len(ordered)) // 10], 2),
    }


def host_us(fn, iters: int, warmups: int = 20) -> dict:
    """Percentiles of fn()'s wall time (µs), the device synchronised before each call."""
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return _percentiles(samples)


def decode_launches(
    runner: ModelRunner, batches: list[int], widths: list[int], start: int, iters: int
) -> list:
    rows = []
    for batch in batches:
        for width in widths:
            ids = torch.randint(0, runner.vocab_size, (batch, width), device="cuda")  # [B, T]
            starts = [start] * batch
            rows.append(
                {"batch": batch, "width": width}
                | host_us(lambda: runner.forward(0, batch, ids, starts), iters)  # noqa: B023
            )
    return rows


def prefill_launches(runner: ModelRunner, lengths: list[int], iters: int) -> list:
    rows = []
    for length in lengths:
        ids = torch.randint(0, runner.vocab_size, (1, length), device="cuda")  # [1, L]
        rows.append(
            {"prompt_tokens": length}
            | host_us(
                lambda: runner.forward(0, 1, ids, [0], last_only=True, lengths=[length]),  # noqa: B023
                iters,
            )
        )
    return rows


def upload_costs(sizes: list[int], iters: int) -> list:
    from service.engine.execution.device import to_device
    from service.engine.execution.staging import UploadStaging

    device = torch.device("cuda")
    staging = UploadStaging(device, max(sizes))

    def staged(values: list[int]) -> torch.Tensor:
        out = staging.upload(values)
        # host_us synchronises before every timed call; in its warm-ups the values never
        # change, so rewriting the buffer while a copy out of it is queued writes the same.
        staging.synchronized()
        return out

    rows = []
    for size in sizes:
        values = list(range(size))
        rows.append(
            {
                "values": size,
                "to_device": host_us(lambda: to_device(values, torch.long, device), iters),  # noqa: B023
                "upload_staging": host_us(lambda: staged(values), iters),  # noqa: B023
            }
        )
    return rows


def _sizes_or_none(text: str) -> list[int]:
    """--uploads: positive_ints, or '' for none."""
    return positive_ints(text) if text else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model directory (or any load_model spec)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=positive_ints, default=[1, 8, 32])
    ap.add_argument("--widths", type=positive_ints, default=[1, 9])
    ap.add_argument("--prefill-lengths", type=positive_ints, default=[16, 100, 200])
    ap.add_argument("--context", type=int, default=300, help="cached tokens per row in the decode passes")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument(
        "--uploads",
        type=_sizes_or_none,
        default=[1, 32, 288],
        help="list sizes for the upload comparison ('' skips it)",
    )
    ap.add_argument("--label", default="", help="names the tree measured, in the output")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.iters < 1:
        ap.error("--iters must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("launch_cost needs CUDA")
    batches, widths = args.batches, args.widths
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype), device="cuda")
    runner = ModelRunner(
        loaded,
        max(batches),
        max(args.context + 2 * max(widths), 512),  # room for the decode rows and the prefill buckets
        max(widths),
        prefill_graph_tokens=512,
        lean_variant="invariant",  # the engine's default (EngineConfig.lean_variant)
    )
    with torch.inference_mode():
        result = {
            "machine": {
                "gpu": torch.cuda.get_device_name(),
                "cpu": f"{platform.machine()} ({os.cpu_count()} cores)",
            },
            "label": args.label,
            "model": args.model,
            "iters": args.iters,
            "decode_graphs": runner.graphs is not None,
            "prefill_graphs": runner.prefill_graphs is not None,
            "decode": decode_launches(runner, batches, widths, args.context, args.iters),
            "prefill": prefill_launches(runner, args.prefill_lengths, args.iters),
        }
        if args.uploads:
            result["uploads"] = upload_costs(args.uploads, args.iters)
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
