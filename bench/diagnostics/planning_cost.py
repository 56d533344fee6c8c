"""The host time of a decode pass's draft planning (DraftPlanner.plan) at N rows, without a
model: n-gram rows in a simulated steady state, as many passes as asked.

    python -m bench.diagnostics.planning_cost --rows 32,64 --passes 2000
    cd OTHER_CHECKOUT && python -m bench.diagnostics.planning_cost ...   # other code, same machine

Planning runs on the host between a pass's synchronisation and the next pass's launch, with
the device idle, so its time adds to every speculating pass (docs/engine.md, "Planning"). In
the engine it is mixed with everything else the host does (bench/diagnostics/adaptive_diag.py
--breakdown measures it there, on a model); here it is alone, on one thread, with the same
inputs pass after pass for any checkout, so two trees compare on one machine within a run.

The world: every row an n-gram request (k = 8) over a prompt of --prompt-tokens tokens, each
pass appending one token drawn from --vocab ids (a small vocabulary makes short n-gram
matches, so some rows propose; nothing is ever accepted, the case of random weights), the
drafters' index catching up as while the device runs, the policy taking the pass's verdicts
and the costs of a Llama-3.1-8B-shaped pass on an H100 (bench/RESULTS.md), so its cap,
backoff and bound behave as they do there. Rows finish after --new-tokens tokens and are
replaced (a new layout, as in the engine); they start together, so their lookups come in
waves. Reports the mean and median of plan()'s time per pass over the passes after the first
tenth (which measure costs and fill the backoff), and over all passes the row lookups per
pass, the lookups the backoff skipped and the policy's choices (nearly all cap 0: the
drafting path is hardly timed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from types import SimpleNamespace

from service.engine.api import Method
from service.engine.speculation.draft_length_policy import DraftLengthPolicy
from service.engine.speculation.drafters import NgramDrafter
from service.engine.speculation.planning import DraftPlanner
from testkit.planned_batch import planned_batch

# Pass seconds by drafts per row at 32 rows (H100, the 8B shape, gpu_pass_cost: 32 x 1, 2, 5, 9).
PASS_COSTS_32 = {0: 8.54e-3, 1: 9.79e-3, 4: 19.42e-3, 8: 31.23e-3}


def pass_cost(rows: int, drafts: int) -> float:
    """A pass's seconds: PASS_COSTS_32 interpolated in drafts, scaled past 32 rows (64 rows
    1.2x: bench/RESULTS.md's plain passes, 10.1-10.5 ms against 8.1-8.7)."""
    widths = sorted(PASS_COSTS_32)
    hi = next(w for w in widths if w >= drafts)
    lo = max(w for w in widths if w <= drafts)
    seconds = PASS_COSTS_32[lo]
    if hi != lo:
        seconds += (PASS_COSTS_32[hi] - PASS_COSTS_32[lo]) * (drafts - lo) / (hi - lo)
    return seconds * max(1.0, 0.8 + 0.2 * rows / 32)


def _row(slot: int, prompt: list[int], new_tokens: int) -> SimpleNamespace:
    """A decoding row as the planner and the n-gram drafter read it."""
    return SimpleNamespace(
        slot=slot,
        k=8,
        max_tokens=new_tokens,
        completion_tokens=0,
        tokens=list(prompt),
        num_drafts=0,
        method=Method.NGRAM,
        decoding=True,
    )


def run(
    rows: int,
    passes: int,
    prompt_tokens: int,
    vocab: int,
    new_tokens: int,
    seed: int,
    lookup_us: float | None,
) -> dict:
    rng = random.Random(seed)
    policy = DraftLengthPolicy()
    if lookup_us is not None:  # the backoff sees every lookup take lookup_us: the same decisions every run
        measured = policy.planning.measured
        policy.planning.measured = lambda rows, seconds, planned: measured(
            rows, planned * lookup_us * 1e-6, planned
        )
    drafter = NgramDrafter(max_n=3, min_n=1)
    planner = DraftPlanner({Method.NGRAM: drafter}, max_context=8192, policy=policy)
    for _ in range(3):  # steady-state costs, as measured by earlier passes
        for drafts in range(9):
            policy.observe(rows, drafts, False, pass_cost(rows, drafts))

    def admit(slot: int) -> SimpleNamespace:
        seq = _row(slot, [rng.randrange(vocab) for _ in range(prompt_tokens)], new_tokens)
        drafter.start(seq)
        drafter.while_device_runs(seq)  # the prompt, indexed while it prefilled
        return seq

    live = [admit(slot) for slot in range(rows)]
    batch = planned_batch(live, drafter, backs_off=True)
    times, lookups = [], 0
    original_plan = drafter.plan

    def counted_plan(seq, limit):
        nonlocal lookups
        lookups += 1
        return original_plan(seq, limit)

    drafter.plan = counted_plan
    for _ in range(passes):
        t0 = time.perf_counter()
        planner.plan(batch)
        times.append(time.perf_counter() - t0)
        for seq in live:  # while the device runs the pass: what the last pass added
            drafter.while_device_runs(seq)
        drafts = max(seq.num_drafts for seq in live)
        for seq in live:  # the verdicts: nothing accepted, one token each
            planner.record(seq, drafter, 0)
            planner.absorb(seq, 0)
            drafter.commit(seq, 0)
            seq.tokens.append(rng.randrange(vocab))
            seq.completion_tokens += 1
        policy.pooled.end_pass()
        policy.observe(rows, drafts, False, pass_cost(rows, drafts), tokens=rows)
        replaced = False
        for i, seq in enumerate(live):
            if seq.completion_tokens >= seq.max_tokens:
                drafter.release(seq)
                planner.release(seq)
                live[i] = admit(seq.slot)
                replaced = True
        if replaced:
            batch = planned_batch(live, drafter, backs_off=True)
    steady = times[passes // 10 :]  # the first passes measure costs and fill the backoff
    return {
        "rows": rows,
        "passes": len(steady),
        "plan_us_mean": round(1e6 * statistics.fmean(steady), 2),
        "plan_us_median": round(1e6 * statistics.median(steady), 2),
        "lookups_per_pass": round(lookups / passes, 2),
        "backoff_skipped": policy.planning.skipped,
        "choices": {f"cap {cap}": n for (_, cap), n in sorted(policy.choices.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,64", help="comma-separated batch sizes")
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=170)
    parser.add_argument("--vocab", type=int, default=2000, help="ids the generated tokens are drawn from")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lookup-us",
        type=float,
        help="the backoff's measure of a lookup, fixed (default: timed, as in the engine): "
        "then every run makes the same decisions, and two trees compare the code alone",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        result = run(
            rows, args.passes, args.prompt_tokens, args.vocab, args.new_tokens, args.seed, args.lookup_us
        )
        results.append(result)
        print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
