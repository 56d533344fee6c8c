"""GPU decoding benchmark: our engine (plain, n-gram, draft model) against transformers, same run.

    python -m bench.gpu_decode --out bench/out/gpu_decode.json
    python -m bench.plots bench/out/gpu_decode.json

SmolLM2-135M-Instruct in bfloat16 by default, greedy, --new-tokens per request (EOS may end
one earlier). Every figure is tokens/s of generated tokens, wall clock from submit to final
(transformers: around generate(), synchronised). Prompts: service/client/loadgen/builtin_prompts.py, two kinds
(input-grounded: summarize, rewrite, code edit; open chat). The draft model is a
layer-truncated copy of the target (bench/common/truncated_draft.py, --draft-layers).

Sections (--sections, run in this order; the JSON is rewritten after each block):
  hf           transformers generate() at batch 1, per prompt kind: plain; prompt lookup
               (prompt_lookup_num_tokens=k); assistant_model=<the truncated draft>
               (num_assistant_tokens=k); static cache + torch.compile(mode="reduce-overhead")
               (transformers' strongest plain configuration; compiled during an untimed
               warm-up over every prompt, skipped on CPU).
  batch1       our engine, one request at a time: none / ngram / draft_model, adaptive draft
               length (--fixed-k turns it off), k = -k; warm-up over every prompt first.
  concurrency  our engine at N concurrent requests (prompts of one kind, cycled), two modes
               (--concurrency-modes): burst (N submitted at once) and sustained (N clients
               sending back to back, 4 requests each); per (N, kind, mode)
               --concurrency-rounds timed rounds, methods alternating in order; aggregate
               tokens/s of the median round: for burst over the whole round, for sustained
               over its steady window (N in flight throughout; the whole round's rate is
               kept as tokens_per_s_whole_round).
  ksweep       a second engine with the adaptive draft length off, batch 1, --ksweep-kinds
               prompts: ngram and draft_model at each k of --k-values, plain in the same
               engine before and after (speedup against k).

Under a hard time limit: --budget-s N skips every block that would start after N seconds
(the JSON lists them); --sections with --append runs the sections in several processes into
one JSON (section_run says which process ran which section; keep hf and batch1 together
for same-run engine / transformers ratios).

CPU smoke run (a tiny random Llama with a real tokenizer; under a minute on two cores):

    python -c "from pathlib import Path; from testkit.tiny_model import save_tiny_model; \\
save_tiny_model(Path('bench/out/tiny-model'), layers=4, max_position=2048)"
    python -m bench.gpu_decode --device cpu --model bench/out/tiny-model --new-tokens 8 \\
        --repeats 1 --concurrency 1,2 --k-values 1,2 --draft-layers 2 --out bench/out/smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_T0 = time.perf_counter()  # before the heavy imports: the logged times include them

import torch  # noqa: E402

from bench.common.arguments import add_gemv_max_rows, gemv_rows_text, write_result  # noqa: E402
from bench.common.time_budget import Budget  # noqa: E402
from bench.common.truncated_draft import truncated_draft  # noqa: E402
from service.client.loadgen.builtin_prompts import KINDS  # noqa: E402
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, Method  # noqa: E402
from service.models.loading import LoadedModel, load_model  # noqa: E402
from specdec_common.logging_setup import configure_logging  # noqa: E402

SECTIONS = ("hf", "batch1", "concurrency", "ksweep")
HF_CONFIGS = ("plain", "prompt_lookup", "assistant", "static_compiled")
ENGINE_METHODS = {"none": Method.NONE, "ngram": Method.NGRAM, "draft_model": Method.DRAFT_MODEL}
RUN_TIMEOUT_S = 300.0  # one engine round that takes longer than this is stuck, not slow


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- engine


@dataclass
class EngineRun:
    """What run_engine measured."""

    wall: float  # seconds from the first submission to the last final result
    outs: list  # [(final, tokens)] in request order
    # Sustained runs (in_flight set) only: the steady window, from the first request's end to
    # the end that let the last request in. Every end in it was at once replaced by the next
    # request, so `in_flight` requests ran throughout: no start-up burst of prefills before
    # it, no drain (fewer and fewer in flight) after it.
    window_seconds: float | None = None
    window_tokens: int | None = None  # tokens delivered in the window


def run_engine(engine: Engine, requests: list[GenerationRequest], in_flight: int | None = None) -> EngineRun:
    """Submits the requests, at most `in_flight` unfinished at a time (None: all at once: as
    many clients as requests; else `in_flight` clients, each sending its next request when
    its last one has finished), and waits for all."""
    done = threading.Semaphore(0)
    finals: dict[str, object] = {}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    delivered: list[tuple[float, int]] = []  # (time, tokens) of every chunk
    ended: list[float] = []  # time of every final result, in order

    def on_event(event) -> None:  # on the engine thread
        if hasattr(event, "token_ids"):
            tokens[event.request_id].extend(event.token_ids)
            delivered.append((time.perf_counter(), len(event.token_ids)))
        else:
            finals[event.request_id] = event
            ended.append(time.perf_counter())
            done.release()

    def one_finished() -> None:
        if not done.acquire(timeout=RUN_TIMEOUT_S):
            raise TimeoutError(
                f"{len(requests) - len(finals)} of {len(requests)} requests had no final result "
                f"after {RUN_TIMEOUT_S} s"
            )

    started = time.perf_counter()
    clients = len(requests) if in_flight is None else in_flight
    for i, request in enumerate(requests):
        if i >= clients:
            one_finished()  # a client's request finished: it sends its next one
        engine.submit(request, on_event)
    for _ in range(min(clients, len(requests))):
        one_finished()
    wall = time.perf_counter() - started
    for r in requests:
        final = finals[r.request_id]
        if final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            raise RuntimeError(f"request {r.request_id} ended {final.finish_reason.name}: {final.error}")
    run = EngineRun(wall, [(finals[r.request_id], tokens[r.request_id]) for r in requests])
    if in_flight is not None and len(requests) > in_flight:
        # The request at index i >= in_flight went in at the (i - in_flight + 1)-th end.
        first, last = ended[0], ended[len(requests) - in_flight - 1]
        if last > first:
            run.window_seconds = last - first
            run.window_tokens = sum(n for t, n in delivered if first < t <= last)
    return run


def metrics_dict(m) -> dict:
    """The counters of one request's SpeculativeMetrics (docs/metrics-contract.md)."""
    return {
        "num_draft_tokens": m.num_draft_tokens,
        "verify_passes": m.verify_passes,
        "draft_passes": m.draft_passes,
        "proposed_drafts": m.proposed_drafts,
        "accepted_drafts": m.accepted_drafts,
        "accept_histogram": list(m.accept_histogram),
        "accept_rate": m.accept_rate if m.HasField("accept_rate") else None,
        "accept_length": m.accept_length if m.HasField("accept_length") else None,
    }


_ids = iter(range(10**9))


def request(prompt: list[int], method: Method, k: int, new_tokens: int, tag: str) -> GenerationRequest:
    return GenerationRequest(
        f"{tag}-{next(_ids)}", tuple(prompt), max_tokens=new_tokens, method=method, num_draft_tokens=k
    )


def bench_engine_batch1(engine, prompts, method, k, new_tokens, repeats, tag) -> list[dict]:
    """One request at a time; per prompt the median of `repeats` runs (the last run's output
    and metrics)."""
    rows = []
    for i, ids in enumerate(prompts):
        times, outs = [], None
        for _ in range(repeats):
            run = run_engine(engine, [request(ids, method, k, new_tokens, tag)])
            wall, outs = run.wall, run.outs
            times.append(wall)
        final, tokens = outs[0]
        m = final.metrics
        seconds = statistics.median(times)
        rows.append(
            {
                "prompt": i,
                "tokens": len(tokens),
                "seconds": seconds,
                "tokens_per_s": len(tokens) / seconds,
                "runs_seconds": times,
                "accept_length": m.accept_length if m.HasField("accept_length") else None,
                "accept_rate": m.accept_rate if m.HasField("accept_rate") else None,
                "metrics": metrics_dict(m),
                "output": tokens,
            }
        )
    return rows


def make_engine(
    target: LoadedModel,
    draft: LoadedModel | None,
    max_batch: int,
    max_k: int,
    k: int,
    adaptive: bool,
    kv_tokens: int,
    capture_all: bool = True,
    lean_variant: str = EngineConfig.lean_variant,
    linear_blocks: Path | None = None,
    gemv_max_rows: int | None = None,
) -> Engine:
    engine = Engine(
        target,
        EngineConfig(
            max_batch_size=max_batch,
            max_queue_size=4096,
            max_num_draft_tokens=max_k,
            default_num_draft_tokens=min(k, max_k),
            kv_cache_tokens=kv_tokens,
            instance_id="bench",
            adaptive_draft_length=adaptive,
            capture_all_graphs=capture_all,  # on: as the service does
            lean_variant=lean_variant,
            linear_blocks=linear_blocks,
            gemv_max_rows=gemv_max_rows,
        ),
        draft=draft,
    )
    engine.start()
    return engine


def policy_choices(engine: Engine) -> dict | None:
    policy = engine.draft_length_policy
    if policy is None:
        return None
    return {f"batch {b} cap {c}": n for (b, c), n in sorted(policy.choices.items())}


# ---------------------------------------------------------------------- transformers


def bench_hf(model, prompts, new_tokens, repeats, device, before_call=None, **generate_kwargs) -> list[dict]:
    rows = []
    for i, ids in enumerate(prompts):
        input_ids = torch.tensor([ids], device=device)
        times = []
        for _ in range(repeats):
            if before_call is not None:
                before_call()
            sync(device)
            started = time.perf_counter()
            out = model.generate(
                input_ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                attention_mask=torch.ones_like(input_ids),
                **generate_kwargs,
            )
            sync(device)
            times.append(time.perf_counter() - started)
        generated = out[0, input_ids.shape[1] :].tolist()
        seconds = statistics.median(times)
        rows.append(
            {
                "prompt": i,
                "tokens": len(generated),
                "seconds": seconds,
                "tokens_per_s": len(generated) / seconds,
                "runs_seconds": times,
                "output": generated,
            }
        )
    return rows


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def hf_config(name: str, loaded: LoadedModel, draft: LoadedModel | None, args, max_prompt: int):
    """(generate kwargs, a callable run before every generate() or None, the settings to record,
    whether every prompt gets a full-length warm-up) for one transformers configuration."""
    import transformers

    k = args.k
    if name == "plain":
        return {}, None, {"generate_kwargs": {}}, False
    if name == "prompt_lookup":
        ngram = getattr(loaded.model.generation_config, "max_matching_ngram_size", None)
        if ngram is None:
            ngram = "unset (PromptLookupCandidateGenerator default, 2)"
        return (
            {"prompt_lookup_num_tokens": k},
            None,
            {"generate_kwargs": {"prompt_lookup_num_tokens": k}, "max_matching_ngram_size": ngram},
            False,
        )
    if name == "assistant":
        gc = draft.model.generation_config  # the assistant's own config holds these settings
        gc.num_assistant_tokens = k
        if args.hf_assistant_schedule is not None:
            gc.num_assistant_tokens_schedule = args.hf_assistant_schedule
        if args.hf_assistant_confidence is not None:
            gc.assistant_confidence_threshold = args.hf_assistant_confidence
        defaults = getattr(transformers.GenerationConfig, "_get_default_generation_params", lambda: {})()
        settings = {}
        for key in (
            "num_assistant_tokens",
            "num_assistant_tokens_schedule",
            "assistant_confidence_threshold",
        ):
            value = getattr(gc, key, None)
            settings[key] = (
                value if value is not None else f"unset (transformers default {defaults.get(key)!r})"
            )
        try:
            from transformers.utils import is_sklearn_available

            # With scikit-learn installed, transformers tunes the confidence threshold per call.
            settings["sklearn_available"] = bool(is_sklearn_available())
        except ImportError:
            pass
        return (
            {"assistant_model": draft.model},
            None,
            {"generate_kwargs": {"assistant_model": draft.name}, "assistant_generation_config": settings},
            False,
        )
    if name == "static_compiled":
        from transformers import CompileConfig, StaticCache

        compile_ok = loaded.device.type == "cuda"
        max_cache_len = max_prompt + args.new_tokens + 8
        # One cache for every call, reset before each: its tensors keep their addresses, so
        # the compiled decode step's CUDA graphs are recorded once, not re-recorded per call
        # (a fresh cache per generate(), as with cache_implementation="static", would).
        cache = StaticCache(config=loaded.model.config, max_cache_len=max_cache_len)
        compile_config = CompileConfig(fullgraph=args.hf_fullgraph, mode="reduce-overhead")
        kwargs = {
            "past_key_values": cache,
            "compile_config": compile_config,
            "disable_compile": not compile_ok,
        }
        settings = {
            "cache": f"transformers.StaticCache(max_cache_len={max_cache_len}), one object reused, "
            "reset() before every generate()",
            "compile": (
                "generate()'s automatic compilation of the decode step (prefill runs eagerly): "
                f"torch.compile({compile_config.to_dict()})"
            )
            if compile_ok
            else "SKIPPED: not on CUDA (reduce-overhead means CUDA graphs); static cache run eagerly "
            "(disable_compile=True), so this row is NOT the compiled configuration",
            "compiled": compile_ok,
            "warmup": "every prompt once at full length, untimed",
        }
        return kwargs, cache.reset, settings, True
    raise ValueError(f"unknown transformers configuration {name!r}")


def section_hf(result, loaded, draft, prompts, args, budget, save) -> None:
    device = loaded.device
    hf = result.setdefault("transformers", {})
    settings = result.setdefault("transformers_settings", {})
    max_prompt = max(len(p) for kind_prompts in prompts.values() for p in kind_prompts)
    first = next(iter(prompts.values()))[:1]
    for name in args.hf_configs:
        if name == "assistant" and draft is None:
            continue
        if not budget.allows(f"transformers {name}"):
            continue
        kwargs, before_call, settings[name], warm_all = hf_config(name, loaded, draft, args, max_prompt)
        started = time.perf_counter()
        graphs_before = compiled_graphs()
        if warm_all:  # compile and record graphs on every prompt, untimed
            for kind_prompts in prompts.values():
                bench_hf(loaded.model, kind_prompts, args.new_tokens, 1, device, before_call, **kwargs)
        else:
            bench_hf(loaded.model, first, 16, 1, device, before_call, **kwargs)
        warm = time.perf_counter() - started
        graphs_warm = compiled_graphs()
        hf[name] = {
            kind: bench_hf(
                loaded.model, kind_prompts, args.new_tokens, args.repeats, device, before_call, **kwargs
            )
            for kind, kind_prompts in prompts.items()
        }
        settings[name]["warmup_seconds"] = warm
        settings[name]["graphs_compiled_in_warmup"] = graphs_warm - graphs_before
        settings[name]["graphs_compiled_in_timed_runs"] = (
            compiled_graphs() - graphs_warm
        )  # 0 = no recompilation
        log(
            f"transformers {name}: warm-up {warm:.1f} s, "
            + ", ".join(f"{kind} {summary(rows):.1f} tok/s" for kind, rows in hf[name].items())
            + (
                f", graphs compiled in timed runs: {settings[name]['graphs_compiled_in_timed_runs']}"
                if warm_all
                else ""
            )
        )
        save()


# -------------------------------------------------------------------------- sections


def section_batch1(result, engine, prompts, methods, args, budget, save) -> None:
    ours = result.setdefault("engine", {})
    for name in methods:
        if not budget.allows(f"batch1 warm-up {name}"):
            continue
        started = time.perf_counter()
        for kind_prompts in prompts.values():  # every prompt once: compiles and captures this run's graphs
            bench_engine_batch1(
                engine, kind_prompts, ENGINE_METHODS[name], args.k, args.new_tokens, 1, "warm"
            )
        log(f"engine batch1 {name}: warm-up {time.perf_counter() - started:.1f} s")
    for name in methods:
        if not budget.allows(f"batch1 {name}"):
            continue
        ours[name] = {
            kind: bench_engine_batch1(
                engine,
                kind_prompts,
                ENGINE_METHODS[name],
                args.k,
                args.new_tokens,
                args.repeats,
                f"b1-{name}",
            )
            for kind, kind_prompts in prompts.items()
        }
        log(
            f"engine batch1 {name}: "
            + ", ".join(f"{kind} {summary(rows):.1f} tok/s" for kind, rows in ours[name].items())
        )
        save()
    result["engine_policy_choices_after_batch1"] = policy_choices(engine)


CONCURRENCY_MODES = ("burst", "sustained")
SUSTAINED_REQUESTS_PER_CLIENT = 4


def section_concurrency(result, engine, prompts, methods, args, budget, save) -> None:
    """Per concurrency N and kind, one untimed burst per method, then per mode
    `--concurrency-rounds` timed rounds, the methods' order alternating round by round;
    each method's row is its median round (every round's tokens/s kept in the row):

    - burst: N requests submitted at once, the round ends when the last one does; its
      time includes the N prompts' prefill passes and the tail, where the slowest request runs alone;
    - sustained: N clients, each sending its next request as soon as its last one finished
      (SUSTAINED_REQUESTS_PER_CLIENT each): N requests in flight, as a server under load
      sees them and as serving benchmarks define concurrency. The figure is the rate of
      the steady window (EngineRun): from the first end to the end that let the last
      request in. The whole round also holds the start (N prefills at once) and the drain,
      where fewer and fewer requests run; with a few requests per client that drain is a
      large share of the round and is longest for the method that desynchronises the
      requests most (speculation helping some of them), which a long-running load does
      not see. The whole round's rate is kept (tokens_per_s_whole_round).

    A burst of 32 lasts about 0.5 s on an H200, so one stall elsewhere in the process moves a
    single round's figure by 10% or more: hence rounds and medians."""
    sweep = result.setdefault("concurrency", [])
    for concurrency in args.concurrency:
        for kind, kind_prompts in prompts.items():
            names = [name for name in methods if budget.allows(f"concurrency {concurrency} {name} {kind}")]
            for name in names:  # warm-up
                run_engine(
                    engine,
                    [
                        request(
                            kind_prompts[i % len(kind_prompts)],
                            ENGINE_METHODS[name],
                            args.k,
                            args.new_tokens,
                            "cw",
                        )
                        for i in range(concurrency)
                    ],
                )
            for mode in args.concurrency_modes:
                total = concurrency * (SUSTAINED_REQUESTS_PER_CLIENT if mode == "sustained" else 1)
                batch = [kind_prompts[i % len(kind_prompts)] for i in range(total)]
                in_flight = concurrency if mode == "sustained" else None
                rounds: dict[str, list[dict]] = {name: [] for name in names}
                for rnd in range(args.concurrency_rounds):
                    for name in names if rnd % 2 == 0 else names[::-1]:
                        method = ENGINE_METHODS[name]
                        run = run_engine(
                            engine,
                            [request(p, method, args.k, args.new_tokens, "c") for p in batch],
                            in_flight,
                        )
                        outs, wall = run.outs, run.wall
                        tokens = sum(len(t) for _, t in outs)
                        proposed = sum(f.metrics.proposed_drafts for f, _ in outs)
                        accepted = sum(f.metrics.accepted_drafts for f, _ in outs)
                        row = {
                            "requests": total,
                            "tokens": tokens,
                            "seconds": wall,
                            "tokens_per_s": tokens / wall,
                            "tokens_per_s_whole_round": tokens / wall,
                            "proposed_drafts": proposed,
                            "accepted_drafts": accepted,
                            "verify_passes": sum(f.metrics.verify_passes for f, _ in outs),
                            "accept_rate": accepted / proposed if proposed else None,
                        }
                        if in_flight is not None:  # sustained: the steady window's rate is the figure
                            row.update(
                                window_seconds=run.window_seconds,
                                window_tokens=run.window_tokens,
                                rate_over="steady window",
                            )
                            if run.window_seconds:
                                row["tokens_per_s"] = run.window_tokens / run.window_seconds
                            else:  # no window (requests ended together): the whole round's rate
                                row["rate_over"] = "whole round (no steady window)"
                        else:
                            row["rate_over"] = "whole round"
                        rounds[name].append(row)
                for name in names:
                    runs = sorted(rounds[name], key=lambda r: r["tokens_per_s"])
                    median = runs[
                        (len(runs) - 1) // 2
                    ]  # a real round (the lower middle one for an even count)
                    sweep.append(
                        {
                            "concurrency": concurrency,
                            "mode": mode,
                            "method": name,
                            "kind": kind,
                            **median,
                            "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds[name]],
                        }
                    )
                    log(
                        f"concurrency {concurrency:3d} {mode:9s} {name:11s} {kind:9s} "
                        f"{median['tokens_per_s']:9.1f} "
                        "tok/s median of "
                        + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rounds[name])
                        + f" ({median['tokens']} tokens in {median['seconds']:.2f} s, "
                        f"{median['proposed_drafts']} drafts proposed)"
                    )
        save()
    result["engine_policy_choices_after_concurrency"] = policy_choices(engine)


def section_ksweep(result, target, draft, prompts, methods, kv_tokens, args, budget, save) -> None:
    kinds = {kind: prompts[kind] for kind in args.ksweep_kinds}
    engine = make_engine(
        target,
        draft,
        1,
        max(args.k_values),
        args.k,
        adaptive=False,
        kv_tokens=kv_tokens,
        lean_variant=args.lean_variant,
        linear_blocks=args.linear_blocks,
        gemv_max_rows=args.gemv_max_rows,
    )
    sweep = result.setdefault("ksweep", {"adaptive_draft_length": False, "kinds": list(kinds), "rows": []})
    try:
        plan = (
            [("none", 0, "plain before")]
            + [(name, k, None) for name in methods if name != "none" for k in args.k_values]
            + [("none", 0, "plain after")]
        )
        for name, k, note in plan:
            if not budget.allows(f"ksweep {name} k={k}"):
                continue
            started = time.perf_counter()
            for kind_prompts in kinds.values():  # warm-up: every prompt once (graphs of this width)
                bench_engine_batch1(engine, kind_prompts, ENGINE_METHODS[name], k, args.new_tokens, 1, "kw")
            warm = time.perf_counter() - started
            by_kind = {
                kind: bench_engine_batch1(
                    engine,
                    kind_prompts,
                    ENGINE_METHODS[name],
                    k,
                    args.new_tokens,
                    args.repeats,
                    f"k{k}-{name}",
                )
                for kind, kind_prompts in kinds.items()
            }
            row = {"method": name, "k": k, "note": note, "warmup_seconds": warm, "by_kind": by_kind}
            for kind, rows in by_kind.items():
                row[f"tokens_per_s {kind}"] = summary(rows)
                row[f"acceptance {kind}"] = acceptance(rows)
            sweep["rows"].append(row)
            log(
                f"ksweep {name:11s} k={k} "
                + ", ".join(f"{kind} {summary(rows):.1f} tok/s" for kind, rows in by_kind.items())
            )
            save()
    finally:
        engine.stop()


# --------------------------------------------------------------------------- summary


def summary(rows) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def agreement(pairs: list[tuple[list[int], list[int]]]) -> float:
    """Share of generated tokens that agree position by position, over all prompts (a
    token past the shorter output counts as disagreeing)."""
    same = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs)
    return same / max(sum(max(len(a), len(b)) for a, b in pairs), 1)


def acceptance(rows) -> dict:
    """Per-pass accepted-draft counts of a method, summed over the rows' final metrics:
    accept_histogram[j] = passes that proposed drafts and accepted exactly j of them."""
    hist: list[int] = []
    totals = {"verify_passes": 0, "draft_passes": 0, "proposed_drafts": 0, "accepted_drafts": 0}
    for r in rows:
        m = r["metrics"]
        for key in totals:
            totals[key] += m[key]
        h = m["accept_histogram"]
        hist += [0] * (len(h) - len(hist))
        for j, n in enumerate(h):
            hist[j] += n
    vp, dp = totals["verify_passes"], totals["draft_passes"]
    return {
        "accept_histogram": hist,
        **totals,
        "passes_without_drafts": vp - dp,
        "share_of_draft_passes_by_accepted": [n / dp for n in hist] if dp else None,
        "accept_rate": totals["accepted_drafts"] / totals["proposed_drafts"]
        if totals["proposed_drafts"]
        else None,
        "accept_length": (totals["accepted_drafts"] + vp) / vp if vp else None,
    }


def build_summary(result: dict) -> dict:
    """The flat table (the earlier runs' keys kept), agreement and acceptance, from whatever
    sections the result holds."""
    table: dict[str, float] = {}
    ours = result.get("engine", {})
    hf = result.get("transformers", {})
    kinds = list(KINDS)
    agree: dict[str, dict[str, float]] = {}

    def pairs_for(a_rows: dict, b_rows: dict, kind_list) -> list:
        return [
            (a["output"], b["output"])
            for kind in kind_list
            if kind in a_rows and kind in b_rows
            for a, b in zip(a_rows[kind], b_rows[kind])
        ]

    for kind in kinds:
        plain = summary(ours["none"][kind]) if kind in ours.get("none", {}) else None
        if plain is not None:
            table[f"engine plain {kind}"] = plain
        for name in ("ngram", "draft_model"):
            if kind not in ours.get(name, {}):
                continue
            rate = summary(ours[name][kind])
            table[f"engine {name} {kind}"] = rate
            if plain is not None:
                table[f"{name}/plain {kind}"] = rate / plain
                table[f"{name} vs plain token agreement {kind}"] = agreement(
                    pairs_for(ours[name], ours["none"], [kind])
                )
        for config, rows in hf.items():
            if kind in rows:
                table[f"transformers {config} {kind}"] = summary(rows[kind])
        # Each engine method against each transformers configuration (ours / theirs).
        for name in ENGINE_METHODS:
            if kind not in ours.get(name, {}):
                continue
            mine = summary(ours[name][kind])
            for config, rows in hf.items():
                if kind in rows:
                    label = "plain" if name == "none" else name
                    table[f"engine {label} / transformers {config} {kind}"] = mine / summary(rows[kind])
    for name in ("ngram", "draft_model"):
        if name in ours and "none" in ours:
            agree[f"engine {name} vs engine plain"] = {
                kind: agreement(pairs_for(ours[name], ours["none"], [kind])) for kind in kinds
            } | {"all": agreement(pairs_for(ours[name], ours["none"], kinds))}
    if "engine ngram vs engine plain" in agree:
        table["ngram vs plain token agreement, all prompts"] = agree["engine ngram vs engine plain"]["all"]
    if "engine draft_model vs engine plain" in agree:
        table["draft_model vs plain token agreement, all prompts"] = agree[
            "engine draft_model vs engine plain"
        ]["all"]
    for config in hf:
        if config != "plain" and "plain" in hf:
            agree[f"transformers {config} vs transformers plain"] = {
                kind: agreement(pairs_for(hf[config], hf["plain"], [kind])) for kind in kinds
            } | {"all": agreement(pairs_for(hf[config], hf["plain"], kinds))}
    if "none" in ours and "plain" in hf:
        agree["engine plain vs transformers plain"] = {
            kind: agreement(pairs_for(ours["none"], hf["plain"], [kind])) for kind in kinds
        } | {"all": agreement(pairs_for(ours["none"], hf["plain"], kinds))}

    # Concurrency: speculation on against off, same N, mode and kind.
    rates = {
        (r["concurrency"], r.get("mode", "burst"), r["method"], r["kind"]): r["tokens_per_s"]
        for r in result.get("concurrency", [])
    }
    for (c, mode, name, kind), rate in sorted(rates.items()):
        table[f"concurrency {c} {mode} {name} {kind} tok/s"] = rate
        if name != "none" and (c, mode, "none", kind) in rates:
            table[f"concurrency {c} {mode} {name}/plain {kind}"] = rate / rates[(c, mode, "none", kind)]

    # k sweep: each k against plain of the same engine (mean of the runs before and after).
    ks = result.get("ksweep", {})
    speedup = []
    for kind in ks.get("kinds", []):
        plains = [r[f"tokens_per_s {kind}"] for r in ks["rows"] if r["method"] == "none"]
        if not plains:
            continue
        base = statistics.mean(plains)
        for r in ks["rows"]:
            if r["method"] != "none":
                acc = r[f"acceptance {kind}"]
                rate = r[f"tokens_per_s {kind}"]
                speedup.append(
                    {
                        "method": r["method"],
                        "k": r["k"],
                        "kind": kind,
                        "tokens_per_s": rate,
                        "plain_tokens_per_s": base,
                        "speedup": rate / base,
                        "accept_rate": acc["accept_rate"],
                        "accept_length": acc["accept_length"],
                    }
                )
                table[f"ksweep {r['method']} k={r['k']}/plain {kind}"] = rate / base

    accept = {
        name: {kind: acceptance(rows) for kind, rows in ours[name].items()}
        for name in ("ngram", "draft_model")
        if name in ours
    }
    return {"summary": table, "agreement": agree, "acceptance_batch1": accept, "ksweep_speedup": speedup}


def targets(table: dict) -> list[str]:
    """The issue's targets, checked against this run (lines for the console)."""
    lines = []
    for kind in KINDS:
        if f"engine plain {kind}" in table:
            v = table[f"engine plain {kind}"]
            lines.append(
                f"plain batch 1 {kind}: {v:.1f} tok/s (target >= 1000): {'met' if v >= 1000 else 'NOT met'}"
            )
    if "ngram/plain grounded" in table:
        v = table["ngram/plain grounded"]
        lines.append(
            f"n-gram / plain, grounded: {v:.2f}x (target >= 2.0): {'met' if v >= 2.0 else 'NOT met'}"
        )
    if "ngram/plain open_chat" in table:
        v = table["ngram/plain open_chat"]
        lines.append(
            f"n-gram / plain, open chat: {v:.2f}x (target >= 0.95): {'met' if v >= 0.95 else 'NOT met'}"
        )
    for key, v in table.items():
        if key.startswith("concurrency 32 ") and "/plain" in key:
            lines.append(f"{key}: {v:.2f}x (target >= 0.95): {'met' if v >= 0.95 else 'NOT met'}")
    return lines


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "-k", type=int, default=4, help="draft length (the cap, with the adaptive draft length)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per prompt at batch 1 (median)")
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 16, 32, 64])
    parser.add_argument(
        "--concurrency-rounds",
        type=int,
        default=3,
        help="timed rounds per concurrency, mode, method and kind (the median is reported)",
    )
    parser.add_argument(
        "--concurrency-modes",
        type=names,
        default=list(CONCURRENCY_MODES),
        help=f"subset of {CONCURRENCY_MODES}",
    )
    parser.add_argument(
        "--sections", type=names, default=list(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--skip-hf", action="store_true", help="drop the hf section")
    parser.add_argument("--hf-configs", type=names, default=list(HF_CONFIGS), help=f"subset of {HF_CONFIGS}")
    parser.add_argument("--methods", type=names, default=list(ENGINE_METHODS), help="engine methods to run")
    parser.add_argument(
        "--lean-variant",
        default=EngineConfig.lean_variant,
        help="the engine's lean forward variant (EngineConfig.lean_variant)",
    )
    parser.add_argument(
        "--linear-blocks",
        type=Path,
        help="a JSON table of the invariant kernels' block shapes over the committed one "
        "(EngineConfig.linear_blocks; service/engine/execution/linear_blocks.py)",
    )
    add_gemv_max_rows(parser)
    parser.add_argument(
        "--no-capture-all",
        action="store_true",
        help="capture graphs lazily, on first use, instead of all at engine start",
    )
    parser.add_argument(
        "--fixed-k",
        action="store_true",
        help="turn the adaptive draft length off in the batch1 and concurrency sections",
    )
    parser.add_argument("--k-values", type=ints, default=list(range(1, 9)), help="the ksweep's draft lengths")
    parser.add_argument("--ksweep-kinds", type=names, default=["grounded"])
    parser.add_argument(
        "--draft-layers",
        type=int,
        default=6,
        help="decoder layers of the target kept in the truncated draft model (0: no draft model)",
    )
    parser.add_argument(
        "--hf-assistant-schedule",
        default=None,
        help="num_assistant_tokens_schedule for the assistant (default: transformers' own)",
    )
    parser.add_argument(
        "--hf-assistant-confidence",
        type=float,
        default=None,
        help="assistant_confidence_threshold (default: transformers' own; 0 drafts all k tokens)",
    )
    parser.add_argument(
        "--hf-fullgraph", action="store_true", help="CompileConfig(fullgraph=True) for static_compiled"
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=1024,
        help="per-slot KV cache of the engines (raised to fit the longest prompt + new tokens)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip every block that would start after this many seconds (the JSON says which; "
        "a concurrency block is one level and prompt kind, every mode and round)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the sections of an existing --out file that this run does not redo",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_decode.json"))
    args = parser.parse_args(argv)
    if args.skip_hf:
        args.sections = [s for s in args.sections if s != "hf"]
    unknown = (
        (set(args.sections) - set(SECTIONS))
        | (set(args.hf_configs) - set(HF_CONFIGS))
        | (set(args.methods) - set(ENGINE_METHODS))
        | (set(args.concurrency_modes) - set(CONCURRENCY_MODES))
    )
    if unknown:
        parser.error(f"unknown names: {sorted(unknown)}")
    if args.concurrency_rounds < 1 or min(args.concurrency, default=1) < 1:
        parser.error("--concurrency-rounds and every --concurrency level must be >= 1")
    if args.draft_layers == 0:
        args.methods = [m for m in args.methods if m != "draft_model"]
        args.hf_configs = [c for c in args.hf_configs if c != "assistant"]
    return args


SECTION_KEYS = {
    "hf": ("transformers", "transformers_settings"),
    "batch1": ("engine", "engine_policy_choices_after_batch1"),
    "concurrency": ("concurrency", "engine_policy_choices_after_concurrency"),
    "ksweep": ("ksweep",),
}


def main(argv=None) -> None:
    args = parse_args(argv)
    # As the service runs: INFO (the engine's per-request line is DEBUG), to stderr.
    configure_logging(os.environ.get("SPECDEC_LOG_LEVEL", "INFO"))
    device = torch.device(args.device)
    budget = Budget(args.budget_s, _T0, log)
    log(f"loading {args.model} on {device}")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    dtype = str(loaded.dtype).removeprefix("torch.")
    draft = truncated_draft(loaded, args.draft_layers) if args.draft_layers else None
    log(f"loaded {loaded.name} ({dtype}); draft: {draft.name if draft else 'none'}")
    prompts = {kind: [chat_ids(loaded.tokenizer, p) for p in texts] for kind, texts in KINDS.items()}
    longest = max(len(p) for ps in prompts.values() for p in ps)
    kv_tokens = max(args.kv_cache_tokens, longest + args.new_tokens + 16)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    )
    import transformers

    run_info = {
        "sections": args.sections,
        "command": " ".join(sys.argv),
        "machine": machine,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

    result: dict = {}
    if args.append and args.out.exists():
        result = json.loads(args.out.read_text())
        for section in args.sections:  # redone now
            for key in SECTION_KEYS[section]:
                result.pop(key, None)
    result.update(
        {
            "machine": machine,
            "torch": torch.__version__,
            "transformers_version": transformers.__version__,
            "python": platform.python_version(),
            "model": args.model,
            "dtype": dtype,
            "device": str(device),
            "new_tokens": args.new_tokens,
            "k": args.k,
            "repeats": args.repeats,
            "adaptive_draft_length": not args.fixed_k,
            "capture_all_graphs": not args.no_capture_all,
            "lean_variant": args.lean_variant,
            "linear_blocks": str(args.linear_blocks) if args.linear_blocks else None,
            "gemv_max_rows": gemv_rows_text(args.gemv_max_rows),
            "command": " ".join(sys.argv),
            "draft_model": {
                "name": draft.name,
                "layers": args.draft_layers,
                "target_layers": loaded.model.config.num_hidden_layers,
                "construction": "bench/common/truncated_draft.py: deep copy of the target's first N "
                "decoder layers, embeddings, final norm and LM head",
            }
            if draft
            else None,
            "prompt_tokens": {kind: [len(p) for p in ps] for kind, ps in prompts.items()},
            "kv_cache_tokens": kv_tokens,
        }
    )
    result.setdefault("runs", []).append(run_info)
    section_run = result.setdefault("section_run", {})  # section -> index in runs
    for section in args.sections:
        section_run[section] = len(result["runs"]) - 1
    result.pop("note", None)
    if "hf" in section_run and "batch1" in section_run and section_run["hf"] != section_run["batch1"]:
        result["note"] = (
            "the hf and batch1 sections come from different processes (see runs, section_run): "
            "engine / transformers ratios are not same-run ratios"
        )

    def save() -> None:
        result.update(build_summary(result))
        result["skipped"] = budget.skipped
        result["elapsed_seconds"] = time.perf_counter() - _T0
        write_result(args.out, result)

    methods = list(args.methods)
    # transformers first: its generate() leaves our engine's graphs alone, and the engine
    # fuses the models' projection weights in place when it starts.
    if "hf" in args.sections:
        section_hf(result, loaded, draft, prompts, args, budget, save)
    if "batch1" in args.sections or "concurrency" in args.sections:
        max_batch = max(args.concurrency) if "concurrency" in args.sections else 1
        engine = make_engine(
            loaded,
            draft if "draft_model" in methods else None,
            max_batch,
            max(args.k, 1),
            args.k,
            adaptive=not args.fixed_k,
            kv_tokens=kv_tokens,
            capture_all=not args.no_capture_all,
            lean_variant=args.lean_variant,
            linear_blocks=args.linear_blocks,
            gemv_max_rows=args.gemv_max_rows,
        )
        try:
            if "batch1" in args.sections:
                section_batch1(result, engine, prompts, methods, args, budget, save)
            if "concurrency" in args.sections:
                section_concurrency(result, engine, prompts, methods, args, budget, save)
        finally:
            engine.stop()
    if "ksweep" in args.sections:
        section_ksweep(
            result,
            loaded,
            draft if "draft_model" in methods else None,
            prompts,
            methods,
            kv_tokens,
            args,
            budget,
            save,
        )
    save()

    table = result["summary"]
    print(
        f"\nmachine: {machine}  model: {args.model} {dtype}  new tokens: {args.new_tokens}  k: {args.k}  "
        f"elapsed: {result['elapsed_seconds']:.1f} s"
    )
    for name, value in table.items():  # the per-point rates were logged above and are in the JSON
        if name.startswith("ksweep ") or (name.startswith("concurrency ") and name.endswith("tok/s")):
            continue
        print(f"{name:60s} {value:10.3f}")
    for line in targets(table):
        print(line)
    if budget.skipped:
        print(f"skipped (time budget): {budget.skipped}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
