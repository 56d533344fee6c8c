"""What one prefill forward costs on a GPU, the dense path against the invariant kernels.

    python -m bench.prefill_cost --model bench/out/models/llama-3.1-8b --out prefill_cost.json

Loads a model directory (bf16 on CUDA), builds the engine's lean forward ("invariant"
variant) over a static KV cache, and times prefill forwards of B rows x T tokens through
its prefill paths: `ModelForward.__call__` with last_only (the row-invariant Triton
kernels: what every prefill ran before), `ModelForward.prefill` (cuBLAS linears and
FlashAttention over packed tokens, service/engine/execution/dense_prefill.py) launched eagerly, and,
for one row of up to 512 tokens, the same pass replayed from a captured graph
(service/engine/execution/prefill_graphs.py, "graphed"). Next to each time: the
matrix throughput it reaches (2 x matrix parameters x tokens + the attention's products,
over the time) and the floor (FLOPs over the measured bf16 matrix rate, weight bytes over
the measured copy bandwidth, whichever is larger). Checks, printed and in the JSON: the two
paths' last-token logits (relative difference, argmax agreement), a prompt prefilled whole
against in two chunks, one row alone against the same row in a padded batch, and both paths
against the float32 forward of the same weights (transformers', loaded a second time).
--profile prints the torch profiler's kernel table for one pass of each path.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from bench.common.cuda_timing import time_ms
from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.model_forward import ModelForward
from service.engine.execution.prefill_graphs import GraphedPrefill


def _ceilings() -> dict[str, float]:
    """The device's bf16 matrix rate (8192^3 product) and copy bandwidth (read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, 10, warmups=2)
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), 10, warmups=2)
    return {"matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_bytes_per_s": 2 * src.numel() / copy_ms * 1e3}


class Prefill:
    """A lean forward and a cache of max_batch rows, fed as the runner feeds a prefill."""

    def __init__(self, lean: ModelForward, max_batch: int, max_len: int) -> None:
        self.lean = lean
        self.cache = StaticKVCache(max_batch, max_len, torch.device("cuda"), lean.embed.dtype)
        self.cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
        # The last cache position is the graphs' scratch: buckets up to it.
        self.graphs = GraphedPrefill(lean, self.cache, 512, scratch_pos=max_len - 1)

    def graphed(self, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        return self.graphs(0, ids, lengths[0])

    def invariant(self, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        b, t = ids.shape
        keys, values = self.cache.rows(0, b)
        starts_t = torch.tensor(starts, device="cuda")
        positions = starts_t[:, None] + torch.arange(t, device="cuda")
        mask = causal_mask(starts_t, t, max(starts) + t, self.lean.embed.dtype)
        last_at = torch.tensor([n - 1 for n in lengths], device="cuda")
        return self.lean(ids, positions, positions, mask, keys, values, last_only=True, last_at=last_at)

    def dense(self, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        keys, values = self.cache.rows(0, ids.shape[0])
        return self.lean.prefill(ids, starts, lengths, keys, values)


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return {
        "relative_difference": float((a - b).norm() / b.norm()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model directory (e.g. written by bench.random_model)")
    parser.add_argument("--shapes", default="1x170,1x2048,12x170,32x64", help="B x T prefill shapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default="1x2048", help="shape whose passes are profiled ('' for none)")
    parser.add_argument("--out", default="", help="JSON output file")
    parser.add_argument(
        "--float32-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the model a second time in float32 and compare each path's logits with it",
    )
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    config = model.config
    lean = ModelForward(model, variant="invariant")
    if not lean.dense_prefill:
        raise SystemExit("the dense prefill is not available on this device")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    max_batch = max(b for b, _ in shapes)
    run = Prefill(lean, max_batch, max(t for _, t in shapes) + 320)
    matrix_params = sum(
        w.numel()
        for layer in lean.layers
        for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ceilings = _ceilings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "matrix_parameters": matrix_params,
        "weight_bytes": weight_bytes,
        **ceilings,
        "shapes": [],
        "checks": {},
    }
    print(
        f"{result['machine']}: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
        f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s"
    )
    heads, layers, head_dim = config.num_attention_heads, config.num_hidden_layers, lean.head_dim
    with torch.inference_mode():
        for b, t in shapes:
            ids = torch.randint(0, config.vocab_size, (b, t), device="cuda", generator=gen)
            starts, lengths = [0] * b, [t] * b
            # 2 x params per token; causal attention: QK^T and PV, half the square on average.
            flops = 2 * matrix_params * b * t + 2 * 2 * layers * heads * head_dim * b * t * (t + 1) / 2
            floor_ms = max(
                flops / ceilings["matmul_tflops"] / 1e9, weight_bytes / ceilings["copy_bytes_per_s"] * 1e3
            )
            row = {"rows": b, "tokens": t, "flops": flops, "floor_ms": floor_ms}
            paths = [("invariant", run.invariant), ("dense", run.dense)]
            if run.graphs.fits(b, starts, lengths):
                paths.append(("graphed", run.graphed))
            for name, fn in paths:
                ms = time_ms(
                    lambda fn=fn, ids=ids, starts=starts, lengths=lengths: fn(ids, starts, lengths),
                    args.repeats,
                    warmups=2,
                )
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flops / ms / 1e9
            row.update(_compare(run.dense(ids, starts, lengths), run.invariant(ids, starts, lengths)))
            graphed = ""
            if "graphed_ms" in row:
                row["graphed_vs_dense"] = _compare(
                    run.graphed(ids, starts, lengths), run.dense(ids, starts, lengths)
                )
                graphed = (
                    f"  graphed {row['graphed_ms']:7.2f} ms (rel diff to dense "
                    f"{row['graphed_vs_dense']['relative_difference']:.2e})"
                )
            result["shapes"].append(row)
            print(
                f"{b:>3} x {t:<5} invariant {row['invariant_ms']:8.2f} ms "
                f"({row['invariant_tflops']:5.0f} TFLOP/s)"
                f"  dense {row['dense_ms']:7.2f} ms ({row['dense_tflops']:5.0f} TFLOP/s){graphed}  floor "
                f"{floor_ms:6.2f} ms"
                f"  logits rel diff {row['relative_difference']:.2e}, argmax agree "
                f"{row['argmax_agreement']:.2f}"
            )

        # Chunks: a 300-token prompt whole, then as 180 + 120 (the second chunk reads the
        # first's keys from the cache); one row alone against the same row padded in a batch.
        ids = ids_300 = torch.randint(0, config.vocab_size, (1, 300), device="cuda", generator=gen)
        whole = run.dense(ids, [0], [300])
        graphed_whole = run.graphed(ids, [0], [300])  # bucket 320
        run.dense(ids[:, :180], [0], [180])
        chunked = run.dense(ids[:, 180:], [180], [120])
        invariant_whole = run.invariant(ids, [0], [300])
        others = torch.randint(0, config.vocab_size, (3, 300), device="cuda", generator=gen)
        batch = torch.cat([others[:1], ids, others[1:]])
        batched = run.dense(batch, [0, 0, 0, 0], [300, 300, 57, 211])[1:2]
        result["checks"] = {
            "chunked_vs_whole": _compare(chunked, whole),
            "whole_vs_invariant": _compare(whole, invariant_whole),
            "batched_vs_alone": _compare(batched, whole),
            "graphed_vs_dense": _compare(graphed_whole, whole),
        }
        for name, check in result["checks"].items():
            print(
                f"{name}: rel diff {check['relative_difference']:.2e}, argmax agree "
                f"{check['argmax_agreement']:.2f}"
            )

        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if args.profile:
            b, t = (int(v) for v in args.profile.split("x"))
            ids = torch.randint(0, config.vocab_size, (b, t), device="cuda", generator=gen)
            for name, fn in (("invariant", run.invariant), ("dense", run.dense)):
                fn(ids, [0] * b, [t] * b)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    fn(ids, [0] * b, [t] * b)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(
                    sort_by="device_time_total", row_limit=12, max_name_column_width=70
                )
                result[f"profile_{name}"] = table
                print(f"--- {name}, {b} x {t}\n{table}")
        # Every path against the float32 forward of the same weights (transformers'), on the
        # 300-token prompt of the checks: how far each bfloat16 prefill lands from exact.
        if not args.float32_check:
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1))
            return 0
        del run
        torch.cuda.empty_cache()
        reference = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, device_map="cuda"
        ).eval()
        exact = reference(ids_300).logits[:, -1].double()  # [1, V]
        for name, got in (("dense", whole), ("graphed", graphed_whole), ("invariant", invariant_whole)):
            error = (got[:, 0].double() - exact).abs()
            result["checks"][f"{name}_vs_float32"] = {
                "max_abs_error": float(error.max()),
                "max_abs_logit": float(exact.abs().max()),
                "relative_difference": float((got[:, 0].double() - exact).norm() / exact.norm()),
                "argmax_agreement": float((got[:, 0].argmax(-1) == exact.argmax(-1)).double().mean()),
            }
            check = result["checks"][f"{name}_vs_float32"]
            print(
                f"{name} vs float32: max |error| {check['max_abs_error']:.3g} (max |logit| "
                f"{check['max_abs_logit']:.3g}), rel diff {check['relative_difference']:.2e}, "
                f"argmax agree {check['argmax_agreement']:.2f}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
