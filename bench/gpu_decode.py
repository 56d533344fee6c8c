"""GPU decoding benchmark: our engine (plain, n-gram) against transformers, same run.

    python bench/gpu_decode.py --out bench/out/gpu_decode.json

Batch 1 (one request at a time), greedy, --new-tokens per prompt, SmolLM2-135M-Instruct in
bfloat16 by default; then aggregate throughput at several concurrencies. Every figure is
tokens/s of generated tokens (wall clock, submit to final). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.prompts import GROUNDED, OPEN_CHAT  # noqa: E402
from service.engine import Engine, EngineConfig, GenerationRequest, Method  # noqa: E402
from service.model_loading import load_model  # noqa: E402


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list]:
    """Submit all, wait for all; returns (wall seconds, finals in order)."""
    done = threading.Semaphore(0)
    finals: dict[str, object] = {}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def on_event(event) -> None:
        if hasattr(event, "token_ids"):
            tokens[event.request_id].extend(event.token_ids)
        else:
            finals[event.request_id] = event
            done.release()

    started = time.perf_counter()
    for request in requests:
        engine.submit(request, on_event)
    for _ in requests:
        done.acquire()
    wall = time.perf_counter() - started
    return wall, [(finals[r.request_id], tokens[r.request_id]) for r in requests]


def bench_engine_batch1(engine, prompts, method, k, new_tokens, repeats):
    rows = []
    for i, ids in enumerate(prompts):
        times, outs = [], None
        for rep in range(repeats):
            req = GenerationRequest(f"{method.name}-{i}-{rep}", tuple(ids), max_tokens=new_tokens,
                                    method=method, num_draft_tokens=k)
            wall, outs = run_engine(engine, [req])
            times.append(wall)
        final, tokens = outs[0]
        m = final.metrics
        rows.append({"prompt": i, "tokens": len(tokens), "seconds": statistics.median(times),
                     "tokens_per_s": len(tokens) / statistics.median(times),
                     "accept_length": m.accept_length if m.HasField("accept_length") else None,
                     "accept_rate": m.accept_rate if m.HasField("accept_rate") else None,
                     "output": tokens})
    return rows


def bench_hf(model, prompts, new_tokens, repeats, **generate_kwargs):
    rows = []
    for i, ids in enumerate(prompts):
        input_ids = torch.tensor([ids], device=model.device)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(input_ids), **generate_kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        generated = out[0, input_ids.shape[1]:].tolist()
        rows.append({"prompt": i, "tokens": len(generated), "seconds": statistics.median(times),
                     "tokens_per_s": len(generated) / statistics.median(times), "output": generated})
    return rows


def summary(rows) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def agreement(pairs: list[tuple[list[int], list[int]]]) -> float:
    """Share of generated tokens that agree position by position, over all prompts (a
    token past the shorter output counts as disagreeing)."""
    same = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs)
    return same / max(sum(max(len(a), len(b)) for a, b in pairs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--fixed-k", action="store_true", help="turn the adaptive draft length off")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_decode.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device="cuda")
    tok = loaded.tokenizer
    grounded = [chat_ids(tok, p) for p in GROUNDED]
    chat = [chat_ids(tok, p) for p in OPEN_CHAT]
    result = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "model": args.model, "dtype": args.dtype,
              "new_tokens": args.new_tokens, "k": args.k, "adaptive_draft_length": not args.fixed_k,
              "command": " ".join(sys.argv)}

    # transformers first (its generate() leaves our engine's graphs alone).
    if not args.skip_hf:
        hf = {}
        for name, kwargs in [("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": args.k})]:
            bench_hf(loaded.model, grounded[:1], 16, 1, **kwargs)  # warm-up
            hf[name] = {"grounded": bench_hf(loaded.model, grounded, args.new_tokens, args.repeats, **kwargs),
                        "open_chat": bench_hf(loaded.model, chat, args.new_tokens, args.repeats, **kwargs)}
        result["transformers"] = hf

    max_batch = max(int(c) for c in args.concurrency.split(","))
    engine = Engine(loaded, EngineConfig(max_batch_size=max_batch, max_queue_size=1024,
                                         max_num_draft_tokens=max(args.k, 1), default_num_draft_tokens=args.k,
                                         kv_cache_tokens=1024, instance_id="bench",
                                         adaptive_draft_length=not args.fixed_k))
    engine.start()
    # Warm-up: every prompt once per method (captures the graphs this run uses).
    for method in (Method.NONE, Method.NGRAM):
        bench_engine_batch1(engine, grounded + chat, method, args.k, args.new_tokens, 1)
    ours = {}
    for method in (Method.NONE, Method.NGRAM):
        ours[method.name.lower()] = {
            "grounded": bench_engine_batch1(engine, grounded, method, args.k, args.new_tokens, args.repeats),
            "open_chat": bench_engine_batch1(engine, chat, method, args.k, args.new_tokens, args.repeats)}
    result["engine"] = ours

    # Concurrency: N requests at once, prompts cycled, aggregate tokens/s.
    sweep = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        for method in (Method.NONE, Method.NGRAM):
            prompts = (grounded + chat) * (concurrency // 6 + 1)
            reqs = [GenerationRequest(f"c{concurrency}-{method.name}-{i}", tuple(prompts[i]),
                                      max_tokens=args.new_tokens, method=method, num_draft_tokens=args.k)
                    for i in range(concurrency)]
            run_engine(engine, reqs)  # warm-up for this batch shape
            wall, outs = run_engine(engine, [GenerationRequest(r.request_id + "-t", r.prompt_token_ids,
                                                               max_tokens=r.max_tokens, method=r.method,
                                                               num_draft_tokens=r.num_draft_tokens) for r in reqs])
            tokens = sum(len(t) for _, t in outs)
            sweep.append({"concurrency": concurrency, "method": method.name.lower(), "tokens": tokens,
                          "seconds": wall, "tokens_per_s": tokens / wall})
    result["concurrency"] = sweep
    engine.stop()

    # Summary table.
    table = {}
    for kind in ("grounded", "open_chat"):
        plain = summary(ours["none"][kind])
        table[f"engine plain {kind}"] = plain
        table[f"engine ngram {kind}"] = summary(ours["ngram"][kind])
        table[f"ngram/plain {kind}"] = table[f"engine ngram {kind}"] / plain
        table[f"ngram vs plain token agreement {kind}"] = agreement(
            [(a["output"], b["output"]) for a, b in zip(ours["none"][kind], ours["ngram"][kind])])
        if "transformers" in result:
            for name in ("plain", "prompt_lookup"):
                hf_rate = summary(result["transformers"][name][kind])
                table[f"transformers {name} {kind}"] = hf_rate
            table[f"engine plain / transformers plain {kind}"] = plain / summary(result["transformers"]["plain"][kind])
            table[f"engine ngram / transformers prompt_lookup {kind}"] = (
                table[f"engine ngram {kind}"] / summary(result["transformers"]["prompt_lookup"][kind]))
    table["ngram vs plain token agreement, all prompts"] = agreement(
        [(a["output"], b["output"]) for kind in ("grounded", "open_chat")
         for a, b in zip(ours["none"][kind], ours["ngram"][kind])])
    result["summary"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}  model: {args.model} {args.dtype}  new tokens: {args.new_tokens}")
    for name, value in table.items():
        print(f"{name:55s} {value:10.3f}")
    for row in sweep:
        print(f"concurrency {row['concurrency']:3d} {row['method']:6s} {row['tokens_per_s']:10.1f} tok/s")


if __name__ == "__main__":
    main()
