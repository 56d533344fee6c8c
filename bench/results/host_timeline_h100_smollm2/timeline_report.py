"""Reads the dumps of timeline.diff (one `tp_PID.txt` per process: `point monotonic_s
thread_cpu_s` lines) and prints the two breakdowns of bench/RESULTS.md's section on them.

    tar xJf timeline_dumps.tar.xz
    python timeline_report.py tp_grpc_process        # a folder of one run's dumps

- every steady decode pass (a scheduler step without a prefill) from `st` to the next `st`:
  st -> d0 (planning), d0 -> dl (building the inputs, the upload, the graph replay's launch),
  dl -> dw (host work while the device runs: delivery), dw -> ds (waiting for the device),
  ds -> de (absorbing the verdicts), de -> next step; wall and CPU time of the engine thread;
- every request, server side, from the front end's receipt (`fe_recv`) to its first chunk
  handed to gRPC (`fe_yield`), or in-process from admission (`eng_admit`) to the first token
  (one request at a time: at batch 1);
- with the engine process: each event message from the core's send (`core_flushed`) to the
  front end's reader (`fe_events`) and on to the loop's drain (`fe_drain`), and for requests
  that arrive together (receipts less than 20 ms apart) the span of their receipts.

The second call's dumps (call2/) hold finer points as well, listed between the coarse ones
when every pass (or request) has them: in a decode pass p_planned, p_prepared, p_built,
p_uploaded (the staged upload), p_proposed, g_starts (the graph's row starts copied),
g_ids (its input ids copied), g_replayed; in an admission a_gen (the request's generator),
a_detok, a_drafter, and in its prefill pf_alloc, pf_fwd (the forward called), q_ids, q_row
(the captured prefill's inputs copied), q_pre, q_replayed, pf_forwarded.
"""

from __future__ import annotations

import bisect
import glob
import os
import statistics
import sys

PASS_POINTS = ("d0", "dl", "dw", "ds", "de")
FINE_PASS = "st d0 p_planned p_prepared p_built p_uploaded p_proposed g_starts g_ids g_replayed dl dw ds de"
FINE_ADMISSION = (
    "eng_admit a_gen a_detok a_drafter st pf_alloc pf_fwd q_ids q_row q_pre q_replayed pf_forwarded "
    "pf_launched pf_synced eng_first"
)
REQUEST_POINTS = {
    "process": "fe_recv fe_mapped fe_submitted core_recv core_submitted eng_wake eng_admit "
    "pf_launched pf_synced eng_first core_flush core_flushed fe_events fe_drain fe_yield",
    "thread": "fe_recv fe_mapped fe_submitted eng_wake eng_admit pf_launched pf_synced eng_first "
    "fe_drain fe_yield",
    "inprocess": "eng_admit pf_launched pf_synced eng_first",
}


def load(path: str) -> list[tuple[str, float, float]]:
    with open(path) as f:
        return [(p[0], float(p[1]), float(p[2])) for p in (line.split() for line in f)]


def decode_passes(events: list[tuple[str, float, float]]) -> list[dict[str, tuple[float, float]]]:
    passes, current = [], None
    for name, wall, cpu in events:
        if name == "st":
            steady = current is not None and "pf_launched" not in current  # no prefill in the step
            if steady and all(p in current for p in PASS_POINTS):
                current["next"] = (wall, cpu)
                passes.append(current)
            current = {"st": (wall, cpu)}
        elif current is not None:
            current[name] = (wall, cpu)
    return passes


def request_breakdown(events: list[tuple[str, float, float]], points: list[str]) -> list[dict[str, float]]:
    starts = [i for i, (name, _, _) in enumerate(events) if name == points[0]]
    out = []
    for j, i in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(events)
        found, k = {}, 0
        for name, wall, _ in events[i:end]:
            if k < len(points) and name == points[k]:
                found[name] = wall
                k += 1
        if k == len(points):
            out.append(found)
    return out[2:]  # the first requests warm up


def quantiles(values: list[float]) -> str:
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return f"p50 {at(0.5):.3f}  p90 {at(0.9):.3f}  p99 {at(0.99):.3f}  max {values[-1]:.3f}"


def message_lags(merged: list[tuple[str, float, float]]) -> bool:
    """Core send -> front-end reader (each reader wake-up against the last send before it),
    reader -> the loop's next drain, and the receipt span of each group of requests; True when
    requests came in groups (bursts)."""
    sent = [t for name, t, _ in merged if name == "core_flushed"]
    read = [t for name, t, _ in merged if name == "fe_events"]
    lags = [(t - sent[i]) * 1e3 for t in read if (i := bisect.bisect_right(sent, t) - 1) >= 0]
    print(f"core -> front end, ms: {quantiles(lags)}")
    drains, pending = [], None
    for name, t, _ in merged:
        if name == "fe_events" and pending is None:
            pending = t
        elif name == "fe_drain" and pending is not None:
            drains.append((t - pending) * 1e3)
            pending = None
    print(f"front end reader -> the loop's drain, ms: {quantiles(drains)}")
    receipts = [t for name, t, _ in merged if name == "fe_recv"]
    groups = [[receipts[0]]] if receipts else []
    for before, after in zip(receipts, receipts[1:]):
        if after - before > 0.02:
            groups.append([after])
        else:
            groups[-1].append(after)
    bursts = [group for group in groups if len(group) > 8]
    for group in bursts:
        print(f"{len(group)} requests received over {(group[-1] - group[0]) * 1e3:.1f} ms")
    return bool(bursts)


def main(folder: str) -> None:
    dumps = {path: load(path) for path in sorted(glob.glob(os.path.join(folder, "tp_*.txt")))}
    merged = sorted((e for events in dumps.values() for e in events), key=lambda e: e[1])
    names = {e[0] for e in merged}
    for path, events in dumps.items():
        passes = decode_passes(events)
        if not passes:
            continue
        print(f"{os.path.basename(path)}: {len(passes)} decode passes, p50 wall / CPU in us")
        keys = [p for p in FINE_PASS.split() if all(p in one for one in passes)] + ["next"]
        for a, b in [*zip(keys, keys[1:]), ("st", "next")]:
            wall = statistics.median(p[b][0] - p[a][0] for p in passes) * 1e6
            cpu = statistics.median(p[b][1] - p[a][1] for p in passes) * 1e6
            print(f"  {a:>11} -> {b:<11} {wall:8.1f} {cpu:8.1f}")
    mode = "process" if "core_flush" in names else "thread" if "fe_recv" in names else "inprocess"
    if mode == "process" and message_lags(merged):
        return  # requests overlap: no per-request breakdown
    points = REQUEST_POINTS[mode].split()
    if mode == "inprocess" and "q_replayed" in names:
        points = FINE_ADMISSION.split()
    requests = request_breakdown(merged, points)
    if requests:
        print(f"requests ({mode}): {len(requests)}, p50 / min / max in ms")
        for a, b in zip(points, points[1:]):
            xs = [(r[b] - r[a]) * 1e3 for r in requests]
            print(f"  {a:>14} -> {b:<14} {statistics.median(xs):7.3f} {min(xs):7.3f} {max(xs):7.3f}")
        total = statistics.median((r[points[-1]] - r[points[0]]) * 1e3 for r in requests)
        print(f"  {points[0]} -> {points[-1]}: {total:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
