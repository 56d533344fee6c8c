"""Cost of one forward pass on the GPU, by path and shape, plus the speedup it predicts.

    python bench/gpu_pass_cost.py --model smollm2-135m-instruct
    python bench/gpu_pass_cost.py --shape llama8b --draft-shape llama1b   # random weights

Times (CUDA events, median of --iters) a pass of B rows x T new tokens against a KV cache
holding --context tokens per row: transformers' own forward (eager, the reference path),
our lean forward eager, replayed from a CUDA graph, and graph + torch.compile fusion.
With a draft shape, also prints the speedup that the measured costs predict for a given
acceptance rate a: tokens per pass (1 - a^(k+1)) / (1 - a) over the pass time
(verify(k) + k * draft) / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.engine.runner import ModelRunner  # noqa: E402
from service.model_loading import LoadedModel, load_model  # noqa: E402

SHAPES = {  # Llama 3.1 8B and Llama 3.2 1B
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
}


def random_model(shape: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.model.rotary_emb.__init__(config, device="cuda")  # buffers were on meta
    return LoadedModel(shape, model.eval(), None, torch.device("cuda"), dtype)


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
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


def measure(loaded: LoadedModel, batches: list[int], widths: list[int], context: int, iters: int,
            paths: list[str]) -> list[dict]:
    rows = []
    max_batch, max_width = max(batches), max(widths)
    runners = {
        "transformers": lambda: ModelRunner(loaded, max_batch, context + max_width + 1, max_width, use_lean=False),
        "lean_eager": lambda: ModelRunner(loaded, max_batch, context + max_width + 1, max_width, use_graphs=False,
                                          use_compile=False),
        "graph": lambda: ModelRunner(loaded, max_batch, context + max_width + 1, max_width, use_compile=False),
        "graph_compiled": lambda: ModelRunner(loaded, max_batch, context + max_width + 1, max_width),
    }
    vocab = loaded.vocab_size
    for path in paths:
        runner = runners[path]()
        for batch in batches:
            for width in widths:
                ids = torch.randint(0, vocab, (batch, width), device="cuda")
                starts = [context] * batch
                with torch.inference_mode():
                    ms = time_ms(lambda: runner.forward(0, batch, ids, starts), iters)
                rows.append({"path": path, "batch": batch, "width": width, "context": context, "ms": ms})
                print(f"{loaded.name:24s} {path:15s} B={batch:3d} T={width} {ms:8.3f} ms", flush=True)
        del runner
        torch.cuda.empty_cache()
    return rows


def predicted_speedup(target_rows, draft_rows, batch: int, accept: float, k: int) -> float:
    cost = {(r["batch"], r["width"]): r["ms"] for r in target_rows if r["path"] == "graph_compiled"}
    draft = {(r["batch"], r["width"]): r["ms"] for r in draft_rows if r["path"] == "graph_compiled"}
    tokens = (1 - accept ** (k + 1)) / (1 - accept)
    return tokens * cost[(batch, 1)] / (cost[(batch, k + 1)] + k * draft[(batch, 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model load_model() knows (real weights)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight shape instead")
    parser.add_argument("--draft-shape", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--widths", default="1,2,3,4,5,6,7,8,9")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--paths", default="transformers,lean_eager,graph,graph_compiled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    paths = args.paths.split(",")
    loaded = load_model(args.model, dtype=dtype, device="cuda") if args.model else random_model(args.shape, dtype)
    result = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "target": loaded.name, "rows": measure(loaded, batches, widths, args.context, args.iters, paths)}
    if args.draft_shape:
        del loaded
        torch.cuda.empty_cache()
        draft = random_model(args.draft_shape, dtype)
        result["draft"] = draft.name
        result["draft_rows"] = measure(draft, batches, [1], args.context, args.iters, ["graph_compiled"])
        table = []
        for batch in batches:
            for accept in (0.5, 0.6, 0.7, 0.8, 0.9):
                best = max(range(1, max(widths)), key=lambda k: predicted_speedup(
                    result["rows"], result["draft_rows"], batch, accept, k))
                speedups = {k: round(predicted_speedup(result["rows"], result["draft_rows"], batch, accept, k), 3)
                            for k in range(1, max(widths))}
                table.append({"batch": batch, "accept_rate": accept, "best_k": best, "speedup_by_k": speedups})
                print(f"predicted B={batch:3d} a={accept:.1f}: best k={best} speedup {speedups[best]:.2f}x  {speedups}")
        result["predicted"] = table
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
