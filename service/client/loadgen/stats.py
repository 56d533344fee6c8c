"""What one run measured, from per-request records: throughput over the steady window,
latency percentiles, and the server's speculative counters summed from the final messages.

All times are the client's time.perf_counter() seconds. Definitions:
- time to first token (TTFT): from just before the call to the arrival of the first chunk;
- inter-token latency (ITL): the gap between two consecutive chunks of one stream (a chunk
  carries every token of one engine pass, several with speculation), i.e. the stalls a
  streaming reader sees; time per output token (TPOT) is per request,
  (end - first chunk) / (tokens - tokens of the first chunk);
- the steady window (steady_window) is where throughput is measured; latencies are over the
  successful requests that started in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy

from specdec.v1 import metrics_pb2

PERCENTILES = (50, 90, 99)
OK = "OK"
# Summed from every successful request's SpeculativeMetrics.
SUMMED_COUNTERS = (
    "prompt_tokens",
    "completion_tokens",
    "verify_passes",
    "draft_passes",
    "proposed_drafts",
    "accepted_drafts",
)


@dataclass
class RequestRecord:
    """One request as the client saw it."""

    index: int  # order of sending within the run
    client: int  # the closed-loop client that sent it; every open-loop and burst request is its own
    start: float
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end: float | None = None
    status: str = OK  # "OK" or the gRPC status code's name (or INCOMPLETE_STREAM)
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metrics: metrics_pb2.SpeculativeMetrics | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def chunk_gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        later_tokens = sum(self.chunk_tokens[1:])
        if self.end is None or not self.chunk_times or later_tokens == 0:
            return None
        return (self.end - self.chunk_times[0]) / later_tokens


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """count, mean and p50/p90/p99 (linear interpolation between order statistics, numpy's
    default); None for an empty sample."""
    data = numpy.asarray(list(values), dtype=float)
    if data.size == 0:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}}
    points = numpy.percentile(data, PERCENTILES)
    return {
        "count": int(data.size),
        "mean": float(data.mean()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, points)},
    }


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    kind: str  # how it was chosen (see steady_window)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def steady_window(mode: str, records: Sequence[RequestRecord], run_start: float) -> Window:
    """Where throughput is measured:

    - burst and rate (open loop): the whole run, from the start to the last end;
    - sustained (closed loop): from the first end to the last start that followed an end
      (the definition of bench/gpu_decode.py's in-process sustained runs): every end in it
      was at once replaced by that client's next request, so all clients were in flight
      throughout; no start-up burst of prefills before it, no drain after it. When no
      request ends inside such a window (fewer than three requests per client at
      concurrency 1, fewer than two otherwise), the whole run, and `kind` says so.
    """
    if mode not in ("burst", "sustained", "rate"):
        raise ValueError(f"unknown mode {mode!r}")
    ends = [r.end for r in records if r.end is not None]
    whole = Window(run_start, max(ends, default=run_start), "whole run")
    if mode != "sustained":
        return whole
    first_of_client: dict[int, int] = {}
    for r in sorted(records, key=lambda r: r.start):
        first_of_client.setdefault(r.client, r.index)
    follow_ups = [r.start for r in records if first_of_client[r.client] != r.index]
    if ends and follow_ups:
        start, end = min(ends), max(follow_ups)
        if any(start < t <= end for t in ends):
            return Window(start, end, "first end to last start")
    return Window(whole.start, whole.end, "whole run (no steady window: too few requests per client)")


def tokens_in(records: Sequence[RequestRecord], window: Window) -> int:
    """Tokens whose chunk arrived in (start, end] (a burst's window starts before any chunk)."""
    return sum(
        n for r in records for t, n in zip(r.chunk_times, r.chunk_tokens) if window.start < t <= window.end
    )


def join_runs(runs: Sequence[tuple[float, Sequence[RequestRecord]]]) -> tuple[float, list[RequestRecord]]:
    """Burst runs of one kind, with other work between them, as one run (run start, records):
    each run's times move back so that it starts where the one before it ended, leaving out
    the time between them; the records are renumbered in that order. Latencies within a
    request do not change; the whole run's duration is the runs' own durations summed."""
    if not runs:
        raise ValueError("join_runs needs at least one run")
    joined: list[RequestRecord] = []
    first_start = runs[0][0]
    end = first_start  # where the last run ended, once moved
    for run_start, records in runs:
        shift = run_start - end  # how far this run moves back
        for r in records:
            joined.append(
                replace(
                    r,
                    index=len(joined),
                    start=r.start - shift,
                    chunk_times=[t - shift for t in r.chunk_times],
                    end=None if r.end is None else r.end - shift,
                )
            )
        ends = [r.end for r in records if r.end is not None]
        end = (max(ends) if ends else run_start) - shift
    return first_start, joined


def summarize(mode: str, level: float, records: Sequence[RequestRecord], run_start: float) -> dict[str, Any]:
    """The report of one run (one method, mode and level)."""
    window = steady_window(mode, records, run_start)
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    in_window = [r for r in ok if window.start <= r.start <= window.end] or ok
    ends = [r.end for r in records if r.end is not None]
    whole = (max(ends) - run_start) if ends else 0.0
    client_tokens = sum(sum(r.chunk_tokens) for r in ok)
    window_tokens = tokens_in(ok, window)
    completed_in_window = sum(1 for r in ok if window.start < r.end <= window.end)
    busy = sum(r.end - r.start for r in ok)
    return {
        "mode": mode,
        "level": level,
        "requests": {
            "sent": len(records),
            "succeeded": len(ok),
            "failed": len(records) - len(ok),
            "errors_by_code": dict(sorted(errors.items())),
            # Requests whose streamed tokens differ in number from the final's completion_tokens.
            "token_count_mismatches": sum(1 for r in ok if sum(r.chunk_tokens) != r.completion_tokens),
        },
        "window": {
            "kind": window.kind,
            "seconds": window.seconds,
            "tokens": window_tokens,
            "completed_requests": completed_in_window,
        },
        "throughput": {
            "tokens_per_s": window_tokens / window.seconds if window.seconds > 0 else None,
            "requests_per_s": completed_in_window / window.seconds if window.seconds > 0 else None,
            "whole_run_seconds": whole,
            "whole_run_tokens": client_tokens,
            "whole_run_tokens_per_s": client_tokens / whole if whole > 0 else None,
            # Per-request rate: tokens over the sum of request durations (send to end); at
            # level 1 it is comparable to bench/gpu_decode.py's batch-1 figure.
            "request_tokens_per_s": client_tokens / busy if busy > 0 else None,
        },
        "latency_s": {
            "requests": len(in_window),
            "ttft": percentiles(r.ttft for r in in_window if r.ttft is not None),
            "itl": percentiles(g for r in in_window for g in r.chunk_gaps),
            "tpot": percentiles(r.tpot for r in in_window if r.tpot is not None),
            "end_to_end": percentiles(r.end - r.start for r in in_window),
            "server_ttft": percentiles(
                r.metrics.time_to_first_token_seconds
                for r in in_window
                if r.metrics is not None and r.metrics.HasField("time_to_first_token_seconds")
            ),
            "server_queue": percentiles(
                r.metrics.queue_time_seconds for r in in_window if r.metrics is not None
            ),
        },
        "server_metrics": server_sums(ok),
    }


def server_sums(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The server's counters summed over the successful requests; the ratios are ratios of
    those sums (docs/metrics-contract.md: never a mean of per-request ratios)."""
    sums = {name: 0 for name in SUMMED_COUNTERS}
    methods: dict[str, int] = {}
    for r in records:
        m = r.metrics
        for name in SUMMED_COUNTERS:
            sums[name] += getattr(m, name)
        method = metrics_pb2.SpeculationMethod.Name(m.method)
        methods[method] = methods.get(method, 0) + 1
    proposed, accepted, verify = sums["proposed_drafts"], sums["accepted_drafts"], sums["verify_passes"]
    return {
        "requests": len(records),
        **sums,
        "accept_rate": accepted / proposed if proposed else None,
        "accept_length": (accepted + verify) / verify if verify else None,
        "methods": dict(sorted(methods.items())),
    }
