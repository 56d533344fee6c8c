"""CPU benchmark of a real target/draft pair: plain greedy vs speculative, same prompts, same run.

Loads the Qwen2.5-Coder 1.5B target and 0.5B draft (known models, fetched and converted into
the cache on first use) on CPU in float32 and measures, on a few code prompts:

  * transformers: ``generate()`` plain greedy, and with ``assistant_model=`` (assisted generation);
  * our engine (``service.engine``), when it imports: methods NONE, DRAFT_MODEL and NGRAM,
    one request at a time.

Greedy decoding in float32 is lossless, so every speculative run must produce the plain run's
tokens; the script reports whether it did. Output: one JSON document on stdout (and --out).

    .venv/bin/python -m bench.cpu_pair [--prompts 3] [--max-new-tokens 128] [--k 4]
        [--target qwen2.5-coder-1.5b-instruct] [--draft qwen2.5-coder-0.5b-instruct]
        [--skip-transformers] [--skip-engine] [--out bench/out/cpu_pair.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from service.models.loading import LoadedModel, check_same_vocabulary, load_model

PROMPTS = [
    "Write a Python function `is_prime(n)` that returns True when n is a prime number, with a "
    "docstring and a few doctests.",
    "Implement binary search over a sorted Python list: a function `binary_search(items, target)` "
    "that returns the index or -1. Explain it briefly.",
    "Write a Python class `LRUCache` with `get(key)` and `put(key, value)` methods and a fixed "
    "capacity, using collections.OrderedDict.",
]


def log(msg: str) -> None:
    print(f"[cpu_pair] {msg}", file=sys.stderr, flush=True)


def prompt_ids(m: LoadedModel, text: str) -> list[int]:
    chat = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return m.tokenizer(chat, add_special_tokens=False).input_ids


def _summary(runs: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in runs)
    secs = sum(r["seconds"] for r in runs)
    return {"new_tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs if secs else None}


# --------------------------------------------------------------------------- transformers


def bench_transformers(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], n: int) -> dict:
    gen = target.model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)

    def run(ids: list[int], assistant: Any | None) -> dict:
        x = torch.tensor([ids])
        kwargs: dict[str, Any] = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad,
                                      attention_mask=torch.ones_like(x))  # fmt: skip
        if assistant is not None:
            kwargs["assistant_model"] = assistant
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.model.generate(x, **kwargs)
        dt = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        return {"new_tokens": len(new), "seconds": dt, "tokens_per_s": len(new) / dt, "token_ids": new}

    log("transformers: warm-up")
    run(prompts[0][:16], None)
    run(prompts[0][:16], draft.model)
    plain, assisted = [], []
    for i, ids in enumerate(prompts):
        p = run(ids, None)
        log(f"transformers plain    prompt {i}: {p['new_tokens']} tokens, {p['tokens_per_s']:.2f} tok/s")
        a = run(ids, draft.model)
        a["same_tokens_as_plain"] = a["token_ids"] == p["token_ids"]
        log(
            f"transformers assisted prompt {i}: {a['new_tokens']} tokens, {a['tokens_per_s']:.2f} tok/s, "
            f"same output: {a['same_tokens_as_plain']}"
        )
        plain.append(p)
        assisted.append(a)
    ps, as_ = _summary(plain), _summary(assisted)
    return {
        "plain": {**ps, "runs": plain},
        "assisted": {**as_, "runs": assisted},
        "speedup": as_["tokens_per_s"] / ps["tokens_per_s"],
        "all_same_tokens": all(a["same_tokens_as_plain"] for a in assisted),
    }


# --------------------------------------------------------------------------- our engine


def bench_engine(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], n: int, k: int) -> dict:
    try:
        from google.protobuf.json_format import MessageToDict

        from service.engine import Engine, EngineConfig, FinalResult, GenerationRequest, Method, TokenChunk
    except Exception as e:  # the engine is optional here
        return {"skipped": f"service.engine not importable: {type(e).__name__}: {e}"}

    longest = max(len(p) for p in prompts) + n + 16
    try:
        config = EngineConfig(max_batch_size=1, default_method=Method.NONE, default_max_tokens=n,
                              kv_cache_tokens=max(512, longest), default_num_draft_tokens=k,
                              max_num_draft_tokens=max(8, k))  # fmt: skip
        engine = Engine(target, config, draft=draft)
        engine.start()
    except Exception as e:
        return {"skipped": f"could not start the engine: {type(e).__name__}: {e}"}

    def run(rid: str, ids: list[int], method: Any) -> dict:
        done = threading.Event()
        tokens: list[int] = []
        final: list[Any] = []

        def on_event(ev: Any) -> None:
            if isinstance(ev, TokenChunk):
                tokens.extend(ev.token_ids)
            elif isinstance(ev, FinalResult):
                final.append(ev)
                done.set()

        t0 = time.perf_counter()
        draft_tokens = None if method is Method.NONE else k
        engine.submit(
            GenerationRequest(rid, tuple(ids), max_tokens=n, method=method, num_draft_tokens=draft_tokens),
            on_event,
        )
        done.wait()
        dt = time.perf_counter() - t0
        f = final[0]
        res = {
            "new_tokens": len(tokens),
            "seconds": dt,
            "tokens_per_s": len(tokens) / dt,
            "token_ids": tokens,
            "finish_reason": f.finish_reason.name,
        }
        if f.error:
            res["error"] = f.error
        m = MessageToDict(f.metrics, preserving_proto_field_name=True)
        keys = (
            "verify_passes",
            "draft_passes",
            "proposed_drafts",
            "accepted_drafts",
            "accept_rate",
            "accept_length",
        )
        res["metrics"] = {key: m.get(key) for key in keys}
        return res

    methods = [Method.NONE, Method.DRAFT_MODEL, Method.NGRAM]
    out: dict[str, Any] = {"k": k}
    try:
        log("engine: warm-up")
        engine.warmup()
        runs: dict[str, list[dict]] = {m.name: [] for m in methods}
        for i, ids in enumerate(prompts):
            for m in methods:
                r = run(f"bench-{m.name.lower()}-{i}", ids, m)
                if m is not Method.NONE:
                    r["same_tokens_as_plain"] = r["token_ids"] == runs["NONE"][i]["token_ids"]
                runs[m.name].append(r)
                log(
                    f"engine {m.name:<11} prompt {i}: {r['new_tokens']} tokens, "
                    f"{r['tokens_per_s']:.2f} tok/s, "
                    f"accept_rate {r['metrics'].get('accept_rate')}, same: "
                    f"{r.get('same_tokens_as_plain', '-')}"
                )
    finally:
        engine.stop(drain_timeout_s=5)
    plain = _summary(runs["NONE"])
    for m in methods:
        s = _summary(runs[m.name])
        out[m.name] = {
            **s,
            "speedup_vs_plain": s["tokens_per_s"] / plain["tokens_per_s"],
            "runs": runs[m.name],
        }
        if m is not Method.NONE:
            out[m.name]["all_same_tokens"] = all(r["same_tokens_as_plain"] for r in runs[m.name])
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per pass for our engine")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--keep-token-ids", action="store_true", help="keep generated token ids in the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "target": args.target, "draft": args.draft, "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
    }  # fmt: skip
    t0 = time.perf_counter()
    target = load_model(args.target, dtype=args.dtype, device="cpu")
    t1 = time.perf_counter()
    draft = load_model(args.draft, dtype=args.dtype, device="cpu")
    t2 = time.perf_counter()
    check_same_vocabulary(target, draft)
    result["load_seconds"] = {"target": t1 - t0, "draft": t2 - t1}
    log(f"loaded target in {t1 - t0:.1f} s, draft in {t2 - t1:.1f} s")

    prompts = [prompt_ids(target, p) for p in PROMPTS[: args.prompts]]
    result["prompt_tokens"] = [len(p) for p in prompts]
    if not args.skip_transformers:
        result["transformers"] = bench_transformers(target, draft, prompts, args.max_new_tokens)
    if not args.skip_engine:
        result["engine"] = bench_engine(target, draft, prompts, args.max_new_tokens, args.k)
    result["machine"]["loadavg_end"] = os.getloadavg()

    if not args.keep_token_ids:
        for part in (result.get("transformers", {}), result.get("engine", {})):
            for v in part.values():
                for r in v.get("runs", []) if isinstance(v, dict) else []:
                    r.pop("token_ids", None)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
