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
- turns: engine steps (Engine.add_pass_observer: one per engine-loop turn), those that
  admitted or prefilled requests (docs/prefill.md), and the longest turn;
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
from service.engine.pass_record import PassRecord
from service.engine.speculation.draft_length_policy import batch_bucket
from service.models.loading import load_model
from specdec_common.logging_setup import configure_logging

REPO = str(Path(__file__).resolve().parents[2])

METHODS = {"none": Method.NONE, "ngram": Method.NGRAM}


class PassBreakdown:
    """Host time of each decode pass by phase (the engine's PassRecord), summed by (method(s)
    of its rows, batch bucket, cap, kv bucket)."""

    PHASES = ("plan", "forward_call", "verify_and_sync", "absorb", "total")

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int, int, int], list[float]] = {}
        self.counts: dict[tuple[str, int, int, int], int] = {}

    def observe(self, record: PassRecord) -> None:
        """An Engine pass observer: steps that prefilled are not a decode pass's cost."""
        if record.prefill_rows or not record.accepted:
            return
        methods = "+".join(sorted({method.name.lower() for method in record.methods}))
        key = (methods, batch_bucket(record.span), record.drafts, record.kv_bucket)
        phases = (record.plan_s, record.forward_s, record.verify_s, record.absorb_s, record.total_s)
        sums = self.sums.setdefault(key, [0.0] * len(self.PHASES))
        for i, seconds in enumerate(phases):
            sums[i] += seconds
        self.counts[key] = self.counts.get(key, 0) + 1

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
    """Cycle collections and engine steps (one per engine-loop turn), counted from reset() on."""

    def __init__(self) -> None:
        self.reset()
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def observe(self, record: PassRecord) -> None:
        """An Engine pass observer."""
        self.turns += 1
        self.admission_turns += bool(record.admitted or record.prefill_rows)
        self.longest_turn_s = max(self.longest_turn_s, record.total_s)

    def reset(self) -> None:
        self.gc_count = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_longest_s = 0.0
        self.turns = self.admission_turns = 0
        self.longest_turn_s = 0.0

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
    engine.add_pass_observer(meter.observe)
    if breakdown is not None:
        engine.add_pass_observer(breakdown.observe)
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
