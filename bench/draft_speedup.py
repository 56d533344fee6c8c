"""Draft-model speculation at a chosen acceptance rate: measured speedup against plain decoding,
next to the cost model's prediction (issue 18, item 4).

    python -m bench.random_model --shape llama-3.1-8b --shape llama-3.2-1b --out bench/out/models
    python -m bench.draft_speedup --size 8b --budget-s 480 --out bench/out/draft_speedup_8b.json

The draft model's proposals are replaced by the target's own greedy continuation, each token
corrupted with probability 1 - alpha (bench/common/oracle_drafter.py, handed to the engine
through `Engine(draft_model_drafter=...)`), while the draft model still runs every pass it
would run: the speed is a real draft model's at that acceptance rate. Greedy, in this
process, one engine per policy (--policies: `fixed`, k drafts every pass; `adaptive`, the
engine's draft-length policy with k as its cap), and per batch size (--batches: 1 = the
prompts one after another, B > 1 = a burst of B requests):

  1. a plain greedy run records each prompt's continuation (the oracle; untimed, a warm-up);
  2. plain, timed, whose output must equal the oracle's (else the engine is not deterministic
     here and the block says so);
  3. per alpha (--alphas): the oracle drafter at that alpha, after an untimed run at the same
     alpha (`fixed`: the first alpha only, for the shapes' first passes; `adaptive`: every
     alpha, from the highest down, so the policy's estimates start where a workload of that
     acceptance keeps them). An untimed speculative run whose output differs from the oracle
     (bfloat16 at batch > 1 can: `refresh_oracle`) replaces the oracle's continuation, and
     the point says for how many rows (`oracle_rows_refreshed_by_warmup`);
  4. plain again (the baseline is the mean of both plain runs; their ratio shows the drift).

Per point: tokens/s and the speedup against plain, the realized acceptance from the requests'
SpeculativeMetrics (accept_rate = accepted / proposed drafts, accept_length = tokens per
pass), the per-token acceptance alpha_hat = accepted / (accepted + rejecting passes) counted
from the passes (Engine.add_pass_observer; the maximum-likelihood estimate of the i.i.d.
model), the rows whose output left the oracle, and the prediction of the cost model of
bench/gpu_pass_cost.py (`predicted_speedup`: tokens per pass (1 - a^(k+1)) / (1 - a) over
(verify(k) + k draft) / plain, from pass costs measured in this run at B rows x T tokens, at
the mean context of the run) at alpha_hat and k; for `adaptive`, at the k' <= k it predicts
best (1.0 where no k' beats plain). The error is split in two: tokens per pass predicted
against realized (the i.i.d. acceptance model), and the pass cost ratio predicted against the
engine's steady decode steps (host time included), realized; for `fixed`, the same token
model over the engine's step costs (`predicted_speedup_engine_step_costs`) is the model with
the pass costs corrected by what the device-only costs leave out (`unmodelled_ms_*`); and
`predicted_speedup_burst` (burst_prediction) is the model corrected for what a block of B rows
pays beyond its mean row's steps: the slowest row's steps, and the time outside steps that
the plain run measures.

Model (--size, from --models-dir as bench.random_model writes it: 8b = the Llama-3.1-8B shape
with the Llama-3.2-1B shape as draft; tiny = the tiny pair for CPU runs), or --target with
--draft (a model directory or known name each) or with --draft-layers (the target's first N
layers, bench/common/truncated_draft.py). The draft model's outputs are never used, so any
draft of the target's vocabulary prices a pass; its shape is what matters.

CPU smoke run (about a minute on two cores; the tiny pair needs the SmolLM2 tokenizer: `make
model`; CPU pass costs are wall-clock medians, noisy on a shared machine):

    python -m bench.draft_speedup --size tiny --write-missing --device cpu --batches 1,2 \\
        --alphas 0,0.5,1 --new-tokens 16 --out bench/out/draft_speedup_tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

_T0 = time.perf_counter()  # before the heavy imports: the logged times include them

import torch  # noqa: E402

from bench.common.arguments import (  # noqa: E402
    add_gemv_max_rows,
    floats,
    gemv_rows_text,
    positive_ints,
    subset_of,
    write_result,
)
from bench.common.oracle_drafter import GreedyOracle, OracleDrafter  # noqa: E402
from bench.common.time_budget import Budget  # noqa: E402
from bench.gpu_pass_cost import expected_tokens, measure, predicted_speedup  # noqa: E402
from service.client.loadgen.builtin_prompts import KINDS  # noqa: E402
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, Method  # noqa: E402
from service.engine.execution.linear_blocks import (  # noqa: E402
    DEFAULT_TABLE,
    BlockTable,
    table_document,
    table_for,
)
from service.engine.execution.runner import ModelRunner  # noqa: E402
from service.engine.pass_record import PassRecord  # noqa: E402
from service.models.loading import LoadedModel, load_model  # noqa: E402
from specdec_common.logging_setup import configure_logging  # noqa: E402

SIZES = {"8b": ("llama-3.1-8b", "llama-3.2-1b"), "tiny": ("tiny", "tiny-draft")}
POLICIES = ("fixed", "adaptive")
RUN_TIMEOUT_S = 600.0  # a run that takes longer is stuck, not slow
RUNS_PER_POINT = 2  # a timed run whose rows left the oracle is run once more (measure_policy)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------- models, prompts


def model_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    """(target, draft or None: a truncated draft) as load_model() specs."""
    if args.target:
        return args.target, args.draft
    target_shape, draft_shape = SIZES[args.size]
    paths = []
    for shape in (target_shape, draft_shape):
        path = args.models_dir / shape
        if not (path / "config.json").is_file():
            if not args.write_missing:
                raise SystemExit(
                    f"no model at {path}: write it with `python -m bench.random_model --shape {shape} "
                    f"--out {path}` (or pass --write-missing)"
                )
            from bench.random_model import smollm2_tokenizer, write_random_model

            write_random_model(path, shape, smollm2_tokenizer(), device=args.device, log=log)
        paths.append(str(path))
    return paths[0], paths[1]


def chat_prompts(tokenizer, count: int, max_tokens: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct chat prompts: the built-in benchmark prompts (both kinds), numbered
    ("Request i.") so that no two requests of a burst share a prompt, and so a continuation;
    each cut to its last `max_tokens` tokens where that is set (the number stays in)."""
    texts = [t for kind in KINDS.values() for t in kind]
    prompts = []
    for i in range(count):
        messages = [{"role": "user", "content": f"{texts[i % len(texts)]}\n\nRequest {i}."}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = messages[0]["content"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(tuple(ids[-max_tokens:] if max_tokens else ids))
    return prompts


# --------------------------------------------------------------------------------- costs


def pass_costs(
    loaded: LoadedModel,
    batches: list[int],
    widths: list[int],
    context: int,
    iters: int,
    variant: str,
    linear_blocks: BlockTable = DEFAULT_TABLE,
    gemv_max_rows: int | None = None,
) -> list[dict]:
    """Milliseconds of one pass of B rows x T tokens over `context` cached tokens per row.
    On CUDA bench/gpu_pass_cost.py's measurement (replayed graphs, the engine's variant, CUDA
    events); on the CPU the same rows from a wall-clock median of the engine's runner."""
    if loaded.device.type == "cuda":
        return measure(
            loaded,
            batches,
            widths,
            context,
            iters,
            ["graph_compiled"],
            [variant],
            linear_blocks=linear_blocks,
            gemv_max_rows=gemv_max_rows,
        )
    runner = ModelRunner(
        loaded,
        max(batches),
        context + max(widths) + 1,
        max(widths),
        use_graphs=False,
        lean_variant=variant,
        linear_blocks=linear_blocks,
        gemv_max_rows=gemv_max_rows,
    )
    shapes = [(batch, width) for batch in batches for width in widths]
    inputs = {shape: torch.randint(0, loaded.vocab_size, shape) for shape in shapes}
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    with torch.inference_mode():
        # Round-robin over the shapes, so that a stall of a shared machine hits every shape
        # alike (or, being rare, none of their medians) instead of all passes of one.
        for i in range(iters + 3):
            for batch, width in shapes:
                starts = [context] * batch
                started = time.perf_counter()
                runner.forward(0, batch, inputs[(batch, width)], starts)
                if i >= 3:  # the first rounds warm up
                    times[(batch, width)].append((time.perf_counter() - started) * 1e3)
    rows = []
    for (batch, width), ms_list in times.items():
        ms = statistics.median(ms_list)
        rows.append({"path": "cpu_eager", "variant": variant, "batch": batch, "width": width, "ms": ms})
        log(f"{loaded.name:24s} cpu B={batch:3d} T={width} {ms:8.3f} ms")
    return rows


# ------------------------------------------------------------------------------- engines


class PassTally:
    """What the timed runs' passes did (Engine.add_pass_observer, on the engine thread): the
    oracle rows' verdicts and the steady decode steps' host seconds by (rows, drafts)."""

    def __init__(self) -> None:
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.proposed = self.accepted = self.rejecting = 0
        self.steps: dict[tuple[int, int], list[float]] = defaultdict(list)

    def __call__(self, record: PassRecord) -> None:
        if not self.active or not record.rows:
            return
        for method, d, a in zip(record.methods, record.proposed, record.accepted):
            if method is Method.DRAFT_MODEL and d:
                self.proposed += d
                self.accepted += a
                self.rejecting += a < d
        if record.steady and not record.prefill_rows:
            self.steps[(record.rows, record.drafts)].append(record.total_s)

    @property
    def alpha_hat(self) -> float | None:
        """Accepted drafts over the verdicts given (each accepted draft, and each first rejection)."""
        trials = self.accepted + self.rejecting
        return self.accepted / trials if trials else None

    def step_ms(self, rows: int, drafts: int | None = None) -> float | None:
        """Median host milliseconds of the steady decode steps of `rows` rows (of `drafts` drafts;
        None: every step with at least one)."""
        times = [
            t
            for (r, d), ts in self.steps.items()
            if r == rows and (d == drafts if drafts is not None else d > 0)
            for t in ts
        ]
        return statistics.median(times) * 1e3 if times else None


def run_requests(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list]:
    """Submits all, waits for all; (wall seconds, [(final, tokens)] in request order)."""
    from bench.gpu_decode import run_engine

    run = run_engine(engine, requests)
    return run.wall, run.outs


def run_block(engine: Engine, prompts, method: Method, k: int, new_tokens: int, batch: int, tag: str):
    """Batch 1: the prompts one after another (the walls summed); else one burst of them all."""
    requests = [
        GenerationRequest(
            f"{tag}-{i}", p, max_tokens=new_tokens, method=method, num_draft_tokens=k if k else None
        )
        for i, p in enumerate(prompts)
    ]
    if batch == 1:
        wall, outs = 0.0, []
        for request in requests:
            w, o = run_requests(engine, [request])
            wall += w
            outs += o
        return wall, outs
    return run_requests(engine, requests)


def totals(outs) -> dict:
    keys = ("verify_passes", "draft_passes", "proposed_drafts", "accepted_drafts")
    sums = {key: sum(getattr(final.metrics, key) for final, _ in outs) for key in keys}
    sums["tokens"] = sum(len(tokens) for _, tokens in outs)
    vp, proposed = sums["verify_passes"], sums["proposed_drafts"]
    sums["accept_rate"] = sums["accepted_drafts"] / proposed if proposed else None
    sums["accept_length"] = (sums["accepted_drafts"] + vp) / vp if vp else None
    hist: list[int] = []
    for final, _ in outs:
        h = list(final.metrics.accept_histogram)
        hist += [0] * (len(h) - len(hist))
        for j, count in enumerate(h):
            hist[j] += count
    sums["accept_histogram"] = hist
    return sums


def slowest_row_steps(
    alpha: float, k: int, new_tokens: int, batch: int, trials: int = 2000
) -> tuple[float, float]:
    """Under the i.i.d. token model (each draft accepted with probability alpha until the first
    rejection, at most k; every step also yields the target's own token), the expected steps a
    row takes to its new_tokens (the first comes from prefill) and the expected steps of the
    slowest of `batch` such rows, which a block of `batch` rows waits for. Monte Carlo, seeded:
    the same inputs give the same figures."""
    gen = torch.Generator().manual_seed(0)
    need = new_tokens - 1
    made = torch.zeros(trials, batch)
    finished_at = torch.zeros(trials, batch)
    step = 0
    while bool((made < need).any()):
        step += 1
        accepted = torch.cumprod((torch.rand(trials, batch, k, generator=gen) < alpha).int(), dim=2).sum(2)
        running = made < need
        made = torch.where(running, made + 1 + accepted, made)
        finished_at = torch.where(running & (made >= need), torch.full_like(made, step), finished_at)
    return finished_at.mean().item(), finished_at.max(dim=1).values.mean().item()


def burst_prediction(row: dict, plains: list[dict], batch: int, k: int, new_tokens: int) -> dict:
    """The cost model corrected for what a block of `batch` rows pays beyond the mean row's
    steps: it waits for its slowest row (slowest_row_steps), and both runs pay the time
    outside decode and verify steps (admission, the target's prefill), measured in the plain
    runs as their wall time less steps x step time. Drafting steps priced as the model prices
    them (modelled_ms_*), scaled to the plain run's measured step."""
    alpha = row["alpha"] if row["alpha_hat"] is None else row["alpha_hat"]
    mean_steps, slowest_steps = slowest_row_steps(alpha, k, new_tokens, batch)
    plain_steps = statistics.mean(r["verify_passes"] / batch for r in plains)  # summed over blocks
    plain_step_s = statistics.mean(r["step_ms"] for r in plains) / 1e3
    outside_s = statistics.mean(
        r["seconds"] - r["verify_passes"] / batch * r["step_ms"] / 1e3 for r in plains
    )
    blocks = plain_steps / (new_tokens - 1)  # blocks of `batch` rows run one after another
    drafting_step_s = plain_step_s * row["modelled_ms_drafting_pass"] / row["modelled_ms_plain_pass"]
    plain_s = outside_s + plain_steps * plain_step_s
    speculative_s = outside_s + blocks * slowest_steps * drafting_step_s
    return {
        "predicted_mean_row_steps": mean_steps,
        "predicted_slowest_row_steps": slowest_steps,
        "measured_outside_steps_s": outside_s,
        "predicted_speedup_burst": plain_s / speculative_s,
    }


def predictions(costs: dict, batch: int, k: int, alpha: float, adaptive: bool) -> dict:
    """The cost model's speedup at alpha: at k, and (adaptive) at its best k' <= k or plain."""
    target, draft, variant, path = costs["target"], costs["draft"], costs["variant"], costs["path"]

    def speedup(kk: int) -> float:
        return predicted_speedup(target, draft, batch, alpha, kk, variant, path)

    cost = {(r["batch"], r["width"]): r["ms"] for r in target}
    draft_ms = {(r["batch"], r["width"]): r["ms"] for r in draft}
    out = {
        "modelled_ms_plain_pass": cost[(batch, 1)],
        "modelled_ms_drafting_pass": cost[(batch, k + 1)] + k * draft_ms[(batch, 1)],
        "predicted_speedup": speedup(k),
        "predicted_tokens_per_pass": expected_tokens(alpha, k),
        "predicted_pass_cost_ratio": (cost[(batch, k + 1)] + k * draft_ms[(batch, 1)]) / cost[(batch, 1)],
    }
    if adaptive:
        by_k = {kk: speedup(kk) for kk in range(1, k + 1)}
        best = max(by_k, key=by_k.get)
        out["predicted_best_k"] = best if by_k[best] > 1.0 else 0
        out["predicted_speedup_best_k"] = max(1.0, by_k[best])
    return out


def plain_run(
    engine: Engine,
    tally: PassTally,
    oracle: GreedyOracle,
    prompts: list[tuple[int, ...]],
    batch: int,
    policy: str,
    args: argparse.Namespace,
    when: str,
) -> dict:
    """A timed plain run; its rows must reproduce the oracle (the engine is deterministic)."""
    tally.reset()
    tally.active = True
    wall, outs = run_block(engine, prompts, Method.NONE, 0, args.new_tokens, batch, "plain")
    tally.active = False
    sums = totals(outs)
    diverged = [p for p, (_, t) in zip(prompts, outs) if oracle.first_divergence(p, t) is not None]
    row = {
        "policy": policy,
        "batch": batch,
        "run": f"plain {when}",
        "seconds": wall,
        "tokens": sums["tokens"],
        "tokens_per_s": sums["tokens"] / wall,
        "verify_passes": sums["verify_passes"],
        "step_ms": tally.step_ms(batch, 0),
        "rows_not_reproducing_the_oracle": len(diverged),
    }
    log(
        f"{policy} B={batch} plain {when}: {row['tokens_per_s']:9.1f} tok/s, "
        f"step {row['step_ms'] or 0:.2f} ms"
        + (f", {len(diverged)} rows NOT reproducing the oracle" if diverged else "")
    )
    return row


def policy_choices(engine: Engine) -> dict[str, int] | None:
    """The adaptive policy's caps so far, passes by "batch bucket B, cap n" (None: fixed k).
    Read between runs, while the engine thread is idle."""
    policy = engine.draft_length_policy
    if policy is None:
        return None
    return {f"B{bucket} cap {cap}": n for (bucket, cap), n in sorted(policy.choices.items())}


def refresh_oracle(oracle: GreedyOracle, prompts: list[tuple[int, ...]], outs) -> int:
    """Records the warm-up's outputs where they differ from the oracle; returns how many did.

    The output of a speculative greedy run is the target's greedy output whatever was drafted,
    computed in passes of (k + 1) x rows token rows; the plain run's passes have `rows`. In
    bfloat16 passes on the two sides of the model's gemv limit round differently
    (docs/engine.md; 16 rows for small models, none at the 8B shape), so where a burst's plain
    passes were at or below the limit (while its requests are admitted) and its verify passes
    above, a row's greedy output may differ, and the speculative one is what the timed
    speculative runs will produce."""
    refreshed = 0
    for prompt, (final, tokens) in zip(prompts, outs):
        if final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            raise RuntimeError(f"{final.request_id} ended {final.finish_reason.name}: {final.error}")
        if oracle.first_divergence(prompt, tokens) is not None:
            oracle.record(prompt, tokens)
            refreshed += 1
    return refreshed


def measure_policy(
    policy: str,
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[tuple[int, ...]],
    costs: dict,
    args: argparse.Namespace,
    kv_tokens: int,
    budget: Budget,
    result: dict,
    save,
) -> None:
    oracle = GreedyOracle()
    made: list[OracleDrafter] = []

    def oracle_drafter(runner: ModelRunner, catch_up_budget: int) -> OracleDrafter:
        made.append(OracleDrafter(runner, catch_up_budget, oracle, alpha=1.0, seed=args.seed))
        return made[-1]

    adaptive = policy == "adaptive"
    started = time.perf_counter()
    engine = Engine(
        target,
        EngineConfig(
            max_batch_size=max(args.batches),
            max_queue_size=4096,
            max_num_draft_tokens=args.k,
            default_num_draft_tokens=args.k,
            kv_cache_tokens=kv_tokens,
            instance_id="bench-draft-speedup",
            adaptive_draft_length=adaptive,
            linear_blocks=args.linear_blocks,
            gemv_max_rows=args.gemv_max_rows,
        ),
        draft=draft,
        draft_model_drafter=oracle_drafter,
    )
    tally = PassTally()
    engine.add_pass_observer(tally)
    engine.start()
    try:
        for batch in args.batches:
            block_prompts = prompts[: args.batch1_prompts] if batch == 1 else prompts[:batch]
            label = f"{policy} B={batch}"
            if not budget.allows(f"{label}: oracle and plain"):
                continue
            _, outs = run_block(engine, block_prompts, Method.NONE, 0, args.new_tokens, batch, "oracle")
            for p, (_, tokens) in zip(block_prompts, outs):
                oracle.record(p, tokens)
            if not made:
                raise RuntimeError("the engine did not build the oracle drafter (draft_model_drafter unused)")
            drafter = made[0]
            log(f"{label}: engine ready and oracle recorded ({time.perf_counter() - started:.1f} s)")

            plain_before = plain_run(engine, tally, oracle, block_prompts, batch, policy, args, "before")
            result["plain"].append(plain_before)
            points = []
            # The adaptive policy learns only while it drafts: after a low alpha it has stopped,
            # and would meet a high one with stale evidence; from high to low it watches the
            # acceptance fall. So it runs the alphas from the highest down, each after an
            # untimed run at that alpha.
            for alpha in sorted(args.alphas, reverse=True) if adaptive else args.alphas:
                if not budget.allows(f"{label} alpha={alpha}"):
                    continue
                drafter.alpha = alpha
                refreshed = None
                if adaptive or not points:  # untimed: the policy settles / the first width is compiled
                    _, warm = run_block(
                        engine, block_prompts, Method.DRAFT_MODEL, args.k, args.new_tokens, batch, "warm"
                    )
                    refreshed = refresh_oracle(oracle, block_prompts, warm)
                    if refreshed:
                        log(f"{label} alpha={alpha}: {refreshed} rows' speculative output != the oracle")
                # A row that leaves the oracle (in bfloat16 a first token prefilled with other
                # rows, or a pass of other width, may round to another near-tie) gets no
                # accepted draft after that and keeps the whole block waiting: such a run
                # measures the oracle, not the cost model, so it is run once more with the
                # oracle refreshed from it (each attempt recorded).
                attempts = []
                for attempt in range(RUNS_PER_POINT):
                    drafter.diverged.clear()
                    choices_before = policy_choices(engine)
                    tally.reset()
                    tally.active = True
                    wall, outs = run_block(
                        engine, block_prompts, Method.DRAFT_MODEL, args.k, args.new_tokens, batch, f"a{alpha}"
                    )
                    tally.active = False
                    for final, _ in outs:
                        if final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                            raise RuntimeError(
                                f"{final.request_id} ended {final.finish_reason.name}: {final.error}"
                            )
                    divergence = [oracle.first_divergence(p, t) for p, (_, t) in zip(block_prompts, outs)]
                    attempts.append(
                        {"seconds": wall, "rows_diverged_from_oracle": sum(d is not None for d in divergence)}
                    )
                    if (
                        not attempts[-1]["rows_diverged_from_oracle"]
                        or attempt + 1 == RUNS_PER_POINT
                        or not budget.allows(f"{label} alpha={alpha}: a second run")
                    ):
                        break
                    left = attempts[-1]["rows_diverged_from_oracle"]
                    log(f"{label} alpha={alpha}: {left} rows left the oracle; again")
                    refresh_oracle(oracle, block_prompts, outs)
                sums = totals(outs)
                alpha_hat = tally.alpha_hat
                row = {
                    "policy": policy,
                    "batch": batch,
                    "k": args.k,
                    "alpha": alpha,
                    "seconds": wall,
                    **sums,
                    "tokens_per_s": sums["tokens"] / wall,
                    "alpha_hat": alpha_hat,
                    "verdicts": tally.accepted + tally.rejecting,
                    "mean_drafts_per_draft_pass": sums["proposed_drafts"] / sums["draft_passes"]
                    if sums["draft_passes"]
                    else 0.0,
                    "mean_accepted_per_draft_pass": sums["accepted_drafts"] / sums["draft_passes"]
                    if sums["draft_passes"]
                    else None,
                    "step_ms_drafting": tally.step_ms(batch),
                    "step_ms_by_drafts": {
                        str(d): statistics.median(ts) * 1e3
                        for (r, d), ts in sorted(tally.steps.items())
                        if r == batch
                    },
                    "rows_diverged_from_oracle": sum(d is not None for d in divergence),
                    "first_divergence": divergence,
                    "rows_whose_pending_token_left_the_oracle": len(drafter.diverged),
                    "oracle_rows_refreshed_by_warmup": refreshed,
                    "attempts": attempts,
                    "policy_caps": None
                    if choices_before is None
                    else {
                        cap: n - choices_before.get(cap, 0)
                        for cap, n in policy_choices(engine).items()
                        if n > choices_before.get(cap, 0)
                    },
                }
                # At the realized alpha_hat where any draft was verified; else (an adaptive
                # policy that never drafted) at the nominal alpha.
                row["predicted_at"] = "alpha_hat" if alpha_hat is not None else "alpha"
                row.update(
                    predictions(costs, batch, args.k, alpha if alpha_hat is None else alpha_hat, adaptive)
                )
                points.append(row)
                save()
            plain_after = (
                plain_run(engine, tally, oracle, block_prompts, batch, policy, args, "after")
                if budget.allows(f"{label}: plain after")
                else None
            )
            plains = [plain_before] + ([plain_after] if plain_after else [])
            if plain_after:
                result["plain"].append(plain_after)
            base = statistics.mean(r["tokens_per_s"] for r in plains)
            base_step = [r["step_ms"] for r in plains if r["step_ms"]]
            for row in sorted(points, key=lambda r: r["alpha"]):
                row["plain_tokens_per_s"] = base
                row["measured_speedup"] = row["tokens_per_s"] / base
                if base_step and row["step_ms_drafting"]:
                    plain_step = statistics.mean(base_step)
                    row["realized_pass_cost_ratio"] = row["step_ms_drafting"] / plain_step
                    # What the device-only costs leave out (host work, launches, the draft's
                    # first step of 2 tokens after a pass that accepted everything), per step.
                    row["unmodelled_ms_plain_step"] = plain_step - row["modelled_ms_plain_pass"]
                    row["unmodelled_ms_drafting_step"] = (
                        row["step_ms_drafting"] - row["modelled_ms_drafting_pass"]
                    )
                    if not adaptive:  # the same i.i.d. token model over the engine's own step costs
                        row["predicted_speedup_engine_step_costs"] = (
                            row["predicted_tokens_per_pass"] / row["realized_pass_cost_ratio"]
                        )
                        row["measured_over_predicted_engine_step_costs"] = (
                            row["measured_speedup"] / row["predicted_speedup_engine_step_costs"]
                        )
                pred = row["predicted_speedup_best_k"] if adaptive else row["predicted_speedup"]
                row["measured_over_predicted"] = row["measured_speedup"] / pred
                if not adaptive and all(r["step_ms"] for r in plains):  # a fixed k: the corrected model
                    row.update(burst_prediction(row, plains, batch, args.k, args.new_tokens))
                    row["measured_over_predicted_burst"] = (
                        row["measured_speedup"] / row["predicted_speedup_burst"]
                    )
                result["points"].append(row)
                log(summary_line(row))
            if plain_after:
                drift = plain_after["tokens_per_s"] / plain_before["tokens_per_s"]
                log(f"{label}: plain after / before {drift:.3f}")
            save()
    finally:
        engine.stop()
        del engine
        gc.collect()
        if target.device.type == "cuda":
            torch.cuda.empty_cache()


def summary_line(row: dict) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    line = (
        f"{row['policy']:8s} B={row['batch']:3d} k={row['k']} alpha={row['alpha']:.2f}: "
        f"{row['tokens_per_s']:9.1f} tok/s, speedup {row['measured_speedup']:.3f}x "
        f"(predicted {fmt(row.get('predicted_speedup_best_k', row.get('predicted_speedup')), '.3f')}x"
    )
    if row.get("predicted_at") == "alpha":
        line += " at the nominal alpha: no draft verified"
    if "predicted_best_k" in row:
        line += f" at k={row['predicted_best_k']}"
    line += (
        f", measured/predicted {fmt(row.get('measured_over_predicted'), '.3f')}); alpha_hat "
        f"{fmt(row['alpha_hat'], '.3f')}, accept_rate {fmt(row['accept_rate'], '.3f')}, accept_length "
        f"{fmt(row['accept_length'], '.2f')} (predicted {fmt(row.get('predicted_tokens_per_pass'), '.2f')}), "
        f"drafts/pass {row['mean_drafts_per_draft_pass']:.2f}, pass cost "
        f"x{fmt(row.get('realized_pass_cost_ratio'), '.2f')} "
        f"(predicted x{fmt(row.get('predicted_pass_cost_ratio'), '.2f')})"
    )
    if "predicted_speedup_burst" in row:
        line += (
            f"; with the slowest row and the time outside steps predicted "
            f"{row['predicted_speedup_burst']:.3f}x "
            f"(measured/predicted {row['measured_over_predicted_burst']:.3f})"
        )
    if "predicted_speedup_engine_step_costs" in row:
        line += f"; over the engine's step costs predicted {row['predicted_speedup_engine_step_costs']:.3f}x"
    if row["rows_diverged_from_oracle"]:
        line += f", {row['rows_diverged_from_oracle']} rows DIVERGED from the oracle"
    return line


# ---------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.draft_speedup",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="8b", help="a bench.random_model pair")
    parser.add_argument("--models-dir", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--write-missing", action="store_true", help="write a missing --size model first")
    parser.add_argument("--target", help="a target model (directory or known name) instead of --size")
    parser.add_argument("--draft", help="its draft model (directory or known name)")
    parser.add_argument(
        "--draft-layers",
        type=int,
        default=0,
        help="with --target and no --draft: the target's first N layers",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batches", type=positive_ints, default=[1, 32])
    parser.add_argument("--alphas", type=floats, default=[0.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("-k", type=int, default=4, help="drafts per pass (the adaptive policy's cap)")
    parser.add_argument(
        "--policies", type=subset_of(POLICIES), default=list(POLICIES), help=f"subset of {POLICIES}"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch1-prompts", type=int, default=3, help="prompts run one by one at batch 1")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=0, help="cut each prompt to its last N tokens (0: whole)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the oracle's corruption draws")
    parser.add_argument("--cost-iters", type=int, default=20, help="timed passes per pass-cost shape")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip every block that would start after this many seconds",
    )
    parser.add_argument(
        "--linear-blocks",
        type=Path,
        help="a JSON table of the invariant kernels' block shapes over the committed one, for the "
        "engines and the pass costs alike (service/engine/execution/linear_blocks.py)",
    )
    add_gemv_max_rows(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/out/draft_speedup.json"))
    args = parser.parse_args(argv)
    if set(args.policies) - set(POLICIES) or not args.policies:
        parser.error(f"--policies: a subset of {POLICIES}")
    if not args.batches or min(args.batches) < 1 or args.k < 1 or args.new_tokens < 2:
        parser.error("--batches must be >= 1, -k >= 1 and --new-tokens >= 2")
    if not args.alphas or not all(0.0 <= a <= 1.0 for a in args.alphas):
        parser.error("--alphas must be in [0, 1]")
    if args.target and not args.draft and args.draft_layers < 1:
        parser.error("--target needs --draft or --draft-layers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(os.environ.get("SPECDEC_LOG_LEVEL", "INFO"))  # as the service runs: INFO, to stderr
    budget = Budget(args.budget_s, _T0, log)
    target_spec, draft_spec = model_paths(args)
    linear_blocks = table_for(args.linear_blocks)  # a bad file fails before the loads
    log(f"loading {target_spec} on {args.device}")
    target = load_model(target_spec, dtype=args.dtype, device=args.device)
    if draft_spec:
        draft = load_model(draft_spec, dtype=target.dtype, device=args.device)
    else:
        from bench.common.truncated_draft import truncated_draft

        draft = truncated_draft(target, args.draft_layers)
    log(f"loaded {target.name} and draft {draft.name} ({target.dtype})")
    prompts = chat_prompts(
        target.tokenizer, max(max(args.batches), args.batch1_prompts), args.max_prompt_tokens
    )
    kv_tokens = max(len(p) for p in prompts) + args.new_tokens + 16
    context = round(statistics.mean(len(p) for p in prompts)) + args.new_tokens // 2
    variant = EngineConfig.lean_variant
    device = target.device
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    )
    result: dict = {
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": target.name,
        "draft": draft.name,
        "dtype": str(target.dtype).removeprefix("torch."),
        "k": args.k,
        "new_tokens": args.new_tokens,
        "batches": args.batches,
        "alphas": args.alphas,
        "seed": args.seed,
        "gemv_max_rows": gemv_rows_text(args.gemv_max_rows),
        "linear_blocks": {
            "file": str(args.linear_blocks) if args.linear_blocks else None,
            "table": table_document(linear_blocks)["entries"],
        },
        "prompt_tokens": [len(p) for p in prompts],
        "drafter": "bench/common/oracle_drafter.py: the draft model's real passes, the target's greedy "
        "continuation as proposals, each token corrupted with probability 1 - alpha",
        "plain": [],
        "points": [],
    }

    def save() -> None:
        result["skipped"] = budget.skipped
        result["elapsed_seconds"] = time.perf_counter() - _T0
        write_result(args.out, result)

    # Pass costs first: the engines fuse the models' weights in place, and both take the
    # same fused layout (gpu_pass_cost measures several runners of one model in a process).
    widths = list(range(1, args.k + 2))
    log(f"pass costs at context {context}: target widths {widths}, draft widths 1, 2")
    costs = {
        "context": context,
        "variant": variant,
        "path": "graph_compiled" if device.type == "cuda" else "cpu_eager",
        "target": pass_costs(
            target, args.batches, widths, context, args.cost_iters, variant, linear_blocks, args.gemv_max_rows
        ),
        "draft": pass_costs(
            draft, args.batches, [1, 2], context, args.cost_iters, variant, linear_blocks, args.gemv_max_rows
        ),
    }
    result["pass_costs"] = costs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save()
    for policy in args.policies:
        if not budget.allows(f"{policy}: every block"):
            continue
        measure_policy(policy, target, draft, prompts, costs, args, kv_tokens, budget, result, save)
    save()
    print(f"\nmachine: {machine}  target: {target.name}  draft: {draft.name}  k: {args.k}")
    for row in result["points"]:
        print(summary_line(row))
    if budget.skipped:
        print(f"skipped (time budget): {budget.skipped}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
