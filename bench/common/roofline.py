"""The batch-1 decoding roofline: a decode pass reads every weight once, so one token costs at
least (weight bytes / memory bandwidth). The bandwidth is measured, not taken from a data
sheet: the best of several large device-to-device copies (a copy of N bytes reads N and
writes N, so it moves 2N bytes).

The weight bytes are the checkpoint's (every stored tensor, as the issue's figures count
them): slightly more than a pass reads, since the input embedding table is gathered row by
row (the bound is conservative by that table's share: 2.7% for the 8B shape).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict:
    """Bytes/s moved by the fastest of `repeats` copies of an `nbytes` buffer on `device`."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    source.fill_(1)
    target = torch.empty_like(source)
    seconds = []
    try:
        target.copy_(source)  # untimed: first-touch and allocator work
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                target.copy_(source)
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                target.copy_(source)
                seconds.append(time.perf_counter() - started)
    finally:
        del source, target
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = min(seconds)
    return {
        "bytes_copied": nbytes,
        "repeats": repeats,
        "best_seconds": best,
        "median_seconds": sorted(seconds)[len(seconds) // 2],
        "bytes_per_s": 2 * nbytes / best,
        "method": "device-to-device copy, read + write counted, best of the repeats",
    }


def checkpoint_weight_bytes(model_dir: Path) -> int:
    """Bytes of every tensor stored in a safetensors model directory (its headers only)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors files")
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                numel = 1
                for n in piece.get_shape():
                    numel *= n
                total += numel * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def roofline_tokens_per_s(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Batch-1 tokens/s if every pass only read the weights at the measured bandwidth."""
    return bandwidth_bytes_per_s / weight_bytes
