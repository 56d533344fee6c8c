"""What speculation does at a given concurrency, n-gram against plain, round by round: where
the time goes when a round is slow.

    python -m bench.diagnostics.adaptive_diag --concurrency 32 --rounds 8 --json out.json
    python -m bench.diagnostics.adaptive_diag --no-freeze-gc ...        # the engine's gc.freeze off
    cd OTHER_CHECKOUT && python -m bench.diagnostics.adaptive_diag ...   # other code, same machine

Rounds of N simultaneous requests (one kind of prompt from
service/client/loadgen/builtin_prompts.py, cycled; 128 new tokens), plain and n-gram with the
adaptive draft length, the order alternating round by round. One engine serves every round, as
the service's does; a warm-up round per kind and method comes first. Per round it prints
tokens/s, row-passes, drafts proposed and accepted, and what the engine thread spent its time
on:

- gc: Python's cycle collections by generation (gc.callbacks, in any thread of the
  process), their total and longest pause: a full collection walks the whole heap and
  stops every thread;
- turns: engine-loop turns (Engine._iterate), those that admitted or prefilled requests
  (docs/prefill.md), and the longest turn;
- with --breakdown, each decode pass's host time split by (batch bucket, cap, kv bucket):
  planning (drafters and policy), the target forward's call (a graph replay is only
  launched), verification (the argmax, the pass's one synchronisation: its wait is the GPU
  time the host did not cover; since the deferred delivery it includes detokenising and
  sending the previous pass's tokens, done while the GPU runs), and absorbing the verdicts
  (counters, appending the tokens; before, detokenising and events too); printed at the end
  as means per pass, by the methods of the pass's rows.

Then per kind and method the median tokens/s, the n-gram / plain ratio of each round pair,
the policy's choices per (batch bucket, cap) and its measured pass costs. --json writes
every round.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.gpu_decode import chat_ids, run_engine
from service.client.loadgen.builtin_prompts import KINDS
from service.engine import Engine, EngineConfig, GenerationRequest, Method
from service.engine import scheduler as scheduler_module
from service.engine.adaptive import batch_bucket
from service.engine.runner import ModelRunner
from service.models.loading import load_model
from specdec_common.logging_setup import configure_logging

REPO = str(Path(__file__).resolve().parents[2])

METHODS = {"none": Method.NONE, "ngram": Method.NGRAM}


class PassBreakdown:
    """Host time of each decode pass by phase, summed by (method(s) of its rows, batch
    bucket, cap, kv bucket)."""

    PHASES = ("plan", "forward_call", "verify_and_sync", "absorb", "total")

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int, int, int], list[float]] = {}
        self.counts: dict[tuple[str, int, int, int], int] = {}
        self._pass: dict[str, float] = {}
        self._key: tuple[int, int, int] | None = None
        meter = self
        Scheduler = scheduler_module.Scheduler
        step, plan, verify = Scheduler.step, Scheduler._plan, Scheduler._verify_greedy_on_host
        draft_and_verify, forward = Scheduler._draft_and_verify, ModelRunner.forward

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    meter._pass[name] = meter._pass.get(name, 0.0) + time.perf_counter() - t0

            return wrapper

        def timed_forward(runner, lo, hi, input_ids, starts, last_only=False, **kwargs):
            if not last_only and meter._key is None:  # the pass's target forward
                width = input_ids.shape[1]
                if runner.graphs is not None:
                    meter._key = runner.graphs.buckets(hi, width, max(starts))
                else:  # eager (CPU): no kv bucket
                    meter._key = (batch_bucket(hi), width, 0)
                meter._key = (meter._key[0], width - 1, meter._key[2])
            return timed("forward_call", forward)(runner, lo, hi, input_ids, starts, last_only, **kwargs)

        def timed_step(scheduler):
            meter._pass, meter._key = {}, None
            methods = "+".join(sorted({seq.method.name.lower() for seq in scheduler.running.values()}))
            prefills = (
                scheduler.prefilling > 0
            )  # the step runs a prefill pass first: not a decode pass's cost
            t0 = time.perf_counter()
            step(scheduler)
            total = time.perf_counter() - t0
            if prefills or meter._key is None or "draft_and_verify" not in meter._pass:
                return
            key = (methods, *meter._key)
            p = meter._pass
            p["total"] = total
            p["absorb"] = total - p["draft_and_verify"]
            sums = meter.sums.setdefault(key, [0.0] * len(meter.PHASES))
            for i, name in enumerate(meter.PHASES):
                sums[i] += p.get(name, 0.0)
            meter.counts[key] = meter.counts.get(key, 0) + 1

        Scheduler.step = timed_step
        Scheduler._plan = timed("plan", plan)
        Scheduler._verify_greedy_on_host = staticmethod(timed("verify_and_sync", verify))
        Scheduler._draft_and_verify = timed("draft_and_verify", draft_and_verify)
        ModelRunner.forward = timed_forward

    def table(self) -> list[dict]:
        return [
            {
                "methods": m,
                "batch": b,
                "cap": c,
                "kv": kv,
                "passes": self.counts[(m, b, c, kv)],
                **{
                    f"{name}_us": round(1e6 * total / self.counts[(m, b, c, kv)], 1)
                    for name, total in zip(self.PHASES, self.sums[(m, b, c, kv)])
                },
            }
            for (m, b, c, kv) in sorted(self.sums)
        ]


class EngineThreadMeter:
    """Cycle collections and engine-loop turns, counted from reset() on."""

    def __init__(self) -> None:
        self.reset()
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)
        meter = self
        iterate, admit = Engine._iterate, scheduler_module.Scheduler.admit

        def timed_iterate(engine, scheduler):
            meter._admitted = scheduler.prefilling > 0  # admitted earlier, still prefilling
            t0 = time.perf_counter()
            try:
                return iterate(engine, scheduler)
            finally:
                elapsed = time.perf_counter() - t0
                meter.turns += 1
                meter.admission_turns += meter._admitted
                meter.longest_turn_s = max(meter.longest_turn_s, elapsed)

        def flagged_admit(scheduler, seq):
            meter._admitted = True
            return admit(scheduler, seq)

        Engine._iterate = timed_iterate
        scheduler_module.Scheduler.admit = flagged_admit

    def reset(self) -> None:
        self.gc_count = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_longest_s = 0.0
        self.turns = self.admission_turns = 0
        self.longest_turn_s = 0.0
        self._admitted = False

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._gc_started
        generation = info["generation"]
        self.gc_count[generation] += 1
        self.gc_seconds[generation] += elapsed
        self.gc_longest_s = max(self.gc_longest_s, elapsed)

    def snapshot(self) -> dict:
        return {
            "gc_collections": list(self.gc_count),
            "gc_ms": [round(s * 1e3, 2) for s in self.gc_seconds],
            "gc_longest_ms": round(self.gc_longest_s * 1e3, 2),
            "turns": self.turns,
            "admission_turns": self.admission_turns,
            "longest_turn_ms": round(self.longest_turn_s * 1e3, 2),
        }


def one_round(
    engine: Engine,
    meter: EngineThreadMeter,
    prompts: list[list[int]],
    method: Method,
    concurrency: int,
    k: int,
    new_tokens: int,
    tag: str,
) -> dict:
    requests = [
        GenerationRequest(
            f"{tag}-{i}",
            tuple(prompts[i % len(prompts)]),
            max_tokens=new_tokens,
            method=method,
            num_draft_tokens=k,
        )
        for i in range(concurrency)
    ]
    meter.reset()
    run = run_engine(engine, requests)
    wall, outs = (run.wall, run.outs) if hasattr(run, "wall") else run  # older checkouts: a tuple
    metrics = [final.metrics for final, _ in outs]
    tokens = sum(len(t) for _, t in outs)
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "row_passes": sum(m.verify_passes for m in metrics),
        "proposed": sum(m.proposed_drafts for m in metrics),
        "accepted": sum(m.accepted_drafts for m in metrics),
        **meter.snapshot(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kinds", default="open_chat,grounded")
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--lean-variant", default=None, help="EngineConfig.lean_variant (default: the engine's)"
    )
    parser.add_argument(
        "--no-freeze-gc", action="store_true", help="EngineConfig.freeze_gc_after_start = False"
    )
    parser.add_argument("--breakdown", action="store_true", help="time each decode pass's host phases")
    parser.add_argument("--json", type=Path, help="write every round here")
    args = parser.parse_args()
    configure_logging(
        os.environ.get("SPECDEC_LOG_LEVEL", "INFO")
    )  # as the service: the per-request lines are DEBUG

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    kinds = {kind: [chat_ids(loaded.tokenizer, p) for p in KINDS[kind]] for kind in args.kinds.split(",")}
    options = dict(
        max_batch_size=args.concurrency,
        max_queue_size=4 * args.concurrency,
        max_num_draft_tokens=args.k,
        default_num_draft_tokens=args.k,
        kv_cache_tokens=1024,
        adaptive_draft_length=True,
        capture_all_graphs=True,
    )
    fields = {
        f.name for f in dataclasses.fields(EngineConfig)
    }  # an older checkout's EngineConfig may lack some
    if args.lean_variant:
        options["lean_variant"] = args.lean_variant
    if "freeze_gc_after_start" in fields:
        options["freeze_gc_after_start"] = not args.no_freeze_gc
    config = EngineConfig(**options)
    meter = EngineThreadMeter()
    breakdown = PassBreakdown() if args.breakdown else None
    engine = Engine(loaded, config)
    engine.start()
    rows = []
    try:
        for kind, prompts in kinds.items():
            for name, method in METHODS.items():  # warm-up: first passes of each shape
                one_round(
                    engine,
                    meter,
                    prompts,
                    method,
                    args.concurrency,
                    args.k,
                    args.new_tokens,
                    f"w-{kind}-{name}",
                )
        for rnd in range(args.rounds):
            for kind, prompts in kinds.items():
                order = list(METHODS.items()) if rnd % 2 == 0 else list(METHODS.items())[::-1]
                for name, method in order:
                    row = {
                        "round": rnd,
                        "kind": kind,
                        "method": name,
                        **one_round(
                            engine,
                            meter,
                            prompts,
                            method,
                            args.concurrency,
                            args.k,
                            args.new_tokens,
                            f"{rnd}-{kind}-{name}",
                        ),
                    }
                    rows.append(row)
                    print(
                        f"round {rnd} {kind:9s} {name:5s} {row['tokens_per_s']:8.0f} tok/s  tokens "
                        f"{row['tokens']}  "
                        f"row-passes {row['row_passes']}  proposed {row['proposed']}  accepted "
                        f"{row['accepted']}  "
                        f"gc {row['gc_collections']} {sum(row['gc_ms']):.1f} ms (longest "
                        f"{row['gc_longest_ms']} ms)  "
                        f"turns {row['turns']} ({row['admission_turns']} admitting, longest "
                        f"{row['longest_turn_ms']} ms)",
                        flush=True,
                    )
    finally:
        engine.stop()

    summary = {}
    for kind in kinds:
        rate = {
            name: [r["tokens_per_s"] for r in rows if r["kind"] == kind and r["method"] == name]
            for name in METHODS
        }
        ratios = [n / p for n, p in zip(rate["ngram"], rate["none"])]
        summary[kind] = {
            "median_tok_s": {name: statistics.median(v) for name, v in rate.items()},
            "ngram_over_none_per_round": [round(x, 3) for x in ratios],
            "ngram_over_none_median": statistics.median(ratios),
        }
        print(
            f"{kind}: median tok/s "
            + ", ".join(f"{n} {statistics.median(v):.0f}" for n, v in rate.items())
            + f"; n-gram / plain per round {summary[kind]['ngram_over_none_per_round']}, "
            f"median {summary[kind]['ngram_over_none_median']:.3f}"
        )
    policy = engine.draft_length_policy
    choices = {f"batch {b} cap {c}": n for (b, c), n in sorted(policy.choices.items())}
    costs = {
        f"batch {b} drafts {d}{' draft model' if m else ''}": round(s * 1e3, 3)
        for (b, d, m), s in sorted(policy.costs().items())
    }
    calibration = {
        bucket: round(c.factor, 3) for bucket, c in sorted(getattr(policy, "calibration", {}).items())
    }
    pooled = {
        str(kind): round(e.rate, 3)
        for kind, e in getattr(getattr(policy, "pooled", None), "kinds", {}).items()
    }
    print("choices (batch bucket, cap) -> passes:", choices)
    print("pass cost ms:", costs)
    planning = getattr(policy, "planning", None)
    skipped_plans = planning.skipped if planning is not None else None
    print(
        "calibration factor by batch bucket:",
        calibration,
        " pooled acceptance by kind:",
        pooled,
        " passes without planning (backoff):",
        skipped_plans,
    )
    phases = breakdown.table() if breakdown is not None else None
    for row in phases or []:
        if row["passes"] >= 20:
            print("breakdown " + "  ".join(f"{key} {value}" for key, value in row.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "repo": REPO,
                    "machine": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__,
                    "model": args.model,
                    "dtype": args.dtype,
                    "concurrency": args.concurrency,
                    "k": args.k,
                    "new_tokens": args.new_tokens,
                    "config": {
                        key: getattr(config, key)
                        if not isinstance(getattr(config, key), Method)
                        else getattr(config, key).name
                        for key in sorted(fields)
                    },
                    "rounds": rows,
                    "summary": summary,
                    "policy_choices": choices,
                    "policy_costs_ms": costs,
                    "policy_calibration": calibration,
                    "policy_pooled_acceptance": pooled,
                    "planning_backoff_skipped_passes": skipped_plans,
                    "pass_breakdown": phases,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
