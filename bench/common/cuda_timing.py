"""Timing GPU work with CUDA events, shared by the pass-cost tools."""

from __future__ import annotations

import statistics

import torch


def time_ms(fn, iters: int, warmups: int = 3) -> float:
    """Median milliseconds of fn() over iters calls after `warmups` untimed ones (CUDA events)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
