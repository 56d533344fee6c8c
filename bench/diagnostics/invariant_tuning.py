"""Block shapes of the row-invariant kernels (service/engine/execution/invariant_kernels.py): pass cost
per configuration, and which kernels keep a row's result bit for bit when the rows around
it change (GPU only).

    python -m bench.diagnostics.invariant_tuning --out bench/out/invariant_tuning.json

Random weights shaped like SmolLM2-135M (bench/gpu_pass_cost.py's "smollm2-135m"). For
each configuration: a fresh runner, graphs replayed for B = 1, 32 and T = 1, 9 at a context
of 512, median ms a pass; then a torch.profiler listing of the best configuration's B = 1,
T = 1 graph. The invariance check runs each kernel on one row alone and on the same row
among eight others, in float32 and bfloat16, and compares the row's output bits.

A diagnostic, not a tool: it gives every weight of the runner one linear block shape (a
BlockTable's defaults), and tries the other settings by assigning the kernel module's
constants (GEMV_MAX_ROWS, ATTN_*) and swapping its `linear` / `attention` at run time.
Candidates at 1B/8B shapes, per weight shape: bench/diagnostics/linear_blocks.py. What it found is in
bench/history/RESULTS-2026-12.md ("How the kernels were tuned").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.common.cuda_timing import time_ms
from bench.gpu_pass_cost import profile_replay, random_model
from service.engine.execution import invariant_kernels as ik
from service.engine.execution.kv_cache import causal_mask
from service.engine.execution.linear_blocks import BlockTable
from service.engine.execution.runner import ModelRunner

KNOBS = (
    "GEMV_MAX_ROWS",
    "GEMV_BLOCK_N",
    "GEMV_BLOCK_K",
    "GEMV_WARPS",
    "BLOCK_N",
    "BLOCK_K",
    "LINEAR_WARPS",
    "LINEAR_STAGES",
    "ATTN_CHUNK",
    "ATTN_WARPS",
)
ALWAYS = 1 << 20  # GEMV_MAX_ROWS: every pass through the CUDA-core kernel
CONFIGS = [  # the last rounds' candidates (earlier rounds: bench/RESULTS.md)
    (0, 4, 256, 4, 64, 64, 4, 3, 64, 4),  # tensor-core kernel only
    (16, 4, 256, 4, 64, 64, 4, 3, 64, 4),  # the default
    (16, 8, 256, 4, 64, 64, 4, 3, 64, 4),
    (16, 4, 512, 4, 64, 64, 4, 3, 64, 4),
    (16, 4, 256, 4, 64, 64, 4, 3, 128, 4),
    (16, 4, 256, 4, 128, 64, 4, 3, 64, 4),
    (16, 4, 256, 4, 32, 64, 4, 3, 64, 4),
    (ALWAYS, 4, 256, 4, 64, 64, 4, 3, 64, 4),
]


def apply(config: tuple) -> tuple[dict, BlockTable]:
    """Sets the kernel module's constants; returns the knobs and the linears' block shapes."""
    knobs = dict(zip(KNOBS, config))
    ik.GEMV_MAX_ROWS = knobs["GEMV_MAX_ROWS"]
    ik.ATTN_CHUNK, ik.ATTN_WARPS = knobs["ATTN_CHUNK"], knobs["ATTN_WARPS"]
    blocks = BlockTable(
        gemv=ik.GemvBlocks(knobs["GEMV_BLOCK_N"], knobs["GEMV_BLOCK_K"], knobs["GEMV_WARPS"]),
        tiles=ik.TileBlocks(
            16, knobs["BLOCK_N"], knobs["BLOCK_K"], knobs["LINEAR_WARPS"], knobs["LINEAR_STAGES"]
        ),
    )
    return knobs, blocks


def pass_costs(loaded, context: int, iters: int, blocks: BlockTable) -> tuple[list[dict], ModelRunner]:
    rows = []
    runner = ModelRunner(
        loaded,
        32,
        context + 10,
        9,
        lean_variant="invariant",
        linear_blocks=blocks,
        gemv_max_rows=ik.GEMV_MAX_ROWS,  # the configuration's (apply); the forward passes it on
    )
    for batch in (1, 32):
        for width in (1, 9):
            ids = torch.randint(0, loaded.vocab_size, (batch, width), device="cuda")
            with torch.inference_mode():
                ms = time_ms(lambda: runner.forward(0, batch, ids, [context] * batch), iters)  # noqa: B023
            rows.append({"batch": batch, "width": width, "ms": round(ms, 4)})
    return rows, runner


DIMS = {"smollm2": (576, 960, 1536, 9, 3, 64), "tiny": (64, 128, 160, 4, 2, 16)}


def invariance(dtype: torch.dtype, dims: str = "smollm2") -> dict:
    """For each kernel: does row 4 of a nine-row call equal the same row computed alone?"""
    torch.manual_seed(0)
    (e, n, i, h, g, d), length = DIMS[dims], 300
    x = (torch.randn(9, e, device="cuda") * 3).to(dtype)
    w = (torch.randn(n, e, device="cuda") * 0.05).to(dtype)
    norm = (1 + 0.1 * torch.randn(e, device="cuda")).to(dtype)
    gate_up = torch.randn(9, 2 * i, device="cuda").to(dtype)
    down = (torch.randn(e, i, device="cuda") * 0.05).to(dtype)
    res = torch.randn(9, e, device="cuda").to(dtype)
    out: dict[str, bool] = {}
    cases = {
        "linear": lambda rows: ik.linear(x[rows], w, out_float32=True),
        "linear_norm": lambda rows: ik.linear(x[rows], w, norm=norm, eps=1e-5, out_float32=True),
        "linear_gated_residual": lambda rows: ik.linear(gate_up[rows], down, gated=True, residual=res[rows]),
    }
    for name, fn in cases.items():
        out[name] = bool(torch.equal(fn(slice(4, 5))[0], fn(slice(0, 9))[4]))
    # Attention: token 4 of a nine-token pass at positions 296..304 against the same token alone.
    qkv = torch.randn(9, (h + 2 * g) * d, device="cuda").to(dtype)
    cos, sin = torch.randn(9, d, device="cuda").to(dtype), torch.randn(9, d, device="cuda").to(dtype)
    k_cache = torch.randn(1, g, 512, d, device="cuda").to(dtype)
    v_cache = torch.randn(1, g, 512, d, device="cuda").to(dtype)
    starts = torch.tensor([length - 4], device="cuda")
    together = ik.attention(
        qkv, cos, sin, k_cache, v_cache, causal_mask(starts, 9, 512, dtype), h, g, d, 0.125
    )
    alone = ik.attention(
        qkv[4:5].contiguous(),
        cos[4:5].contiguous(),
        sin[4:5].contiguous(),
        k_cache,
        v_cache,
        causal_mask(torch.tensor([length], device="cuda"), 1, length + 1, dtype),
        h,
        g,
        d,
        0.125,
    )
    out["attention"] = bool(torch.equal(together[4], alone[0]))
    # The same row alone under one block shape and among 40 rows under another.
    many = torch.randn(40, e, device="cuda").to(dtype)
    many[4] = x[4]
    for bn_alone, bn_many, warps in ((16, 64, 4), (32, 128, 4), (16, 64, 2)):
        alone_row = ik.linear(
            x[4:5].expand(17, -1).contiguous(),
            w,
            norm=norm,
            eps=1e-5,
            out_float32=True,
            tiles=ik.TileBlocks(16, bn_alone, 64, warps, 3),
        )[0]
        out[f"tensor-core linear_norm BN {bn_alone}/{warps} warps vs {bn_many}/4"] = bool(
            torch.equal(
                alone_row,
                ik.linear(
                    many, w, norm=norm, eps=1e-5, out_float32=True, tiles=ik.TileBlocks(16, bn_many, 64, 4, 3)
                )[4],
            )
        )
    out["linear_norm 1 row (CUDA cores) vs 40 rows (tensor cores)"] = bool(
        torch.equal(
            ik.linear(x[4:5], w, norm=norm, eps=1e-5, out_float32=True)[0],
            ik.linear(many, w, norm=norm, eps=1e-5, out_float32=True)[4],
        )
    )
    return out


@torch.inference_mode()
def forward_diff(dtype: torch.dtype) -> list[str]:
    """Tiny Llama (the shape of tests/engine/test_invariant_kernels.py): token 60 in a pass of
    one token against the same token first of a pass of eight; names every kernel call (and
    the rotary tables) whose output row differs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from service.engine.execution.kv_cache import StaticKVCache
    from service.engine.execution.model_forward import ModelForward

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                initializer_range=0.2,
            )
        )
        .eval()
        .to("cuda", dtype)
    )
    lean = ModelForward(model, variant="invariant", gemv_max_rows=ik.GEMV_MAX_ROWS)
    cache = StaticKVCache(max_batch=1, max_len=96, device=torch.device("cuda"), dtype=dtype)
    cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
    keys, values = cache.rows(0, 1)
    log: list[tuple[str, torch.Tensor]] = []
    originals = {name: getattr(ik, name) for name in ("linear", "attention")}
    rotary = lean.rotary

    def recorded(name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            log.append((name, out[0].clone()))
            return out

        return call

    def recorded_rotary(x, positions):
        cos, sin = rotary(x, positions)  # [B, T, D]
        log.append(("rotary cos", cos[0, 0].clone()))
        log.append(("rotary sin", sin[0, 0].clone()))
        return cos, sin

    def run(tokens, start):
        t = tokens.shape[1]
        starts = torch.tensor([start], device="cuda")
        positions = starts[:, None] + torch.arange(t, device="cuda")
        return lean(tokens, positions, positions, causal_mask(starts, t, start + t, dtype), keys, values)

    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 300, (1, 60), generator=gen).to("cuda")
    tokens = torch.randint(0, 300, (1, 8), generator=gen).to("cuda")
    run(prompt, 0)
    logs = []
    for piece in (tokens[:, :1], tokens):
        log.clear()
        ik.linear, ik.attention = (
            recorded("linear", originals["linear"]),
            recorded("attention", originals["attention"]),
        )
        lean.rotary = recorded_rotary
        run(piece, 60)
        logs.append(list(log))
    ik.linear, ik.attention = originals["linear"], originals["attention"]
    lean.rotary = rotary
    return [f"call {j} {name}" for j, ((name, a), (_, b)) in enumerate(zip(*logs)) if not torch.equal(a, b)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--configs", default="all", help="comma-separated indices into CONFIGS, or all")
    parser.add_argument("--out", type=Path, default=Path("bench/out/invariant_tuning.json"))
    args = parser.parse_args(argv)
    picked = CONFIGS if args.configs == "all" else [CONFIGS[int(j)] for j in args.configs.split(",")]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "invariance": {},
        "configs": [],
    }
    defaults = (ik.GEMV_MAX_ROWS, ik.ATTN_CHUNK, ik.ATTN_WARPS)
    for dims in DIMS:
        for dtype in (torch.float32, torch.bfloat16):
            result["invariance"][f"{dims} {dtype}"] = found = invariance(dtype, dims)
            print("invariant rows", dims, dtype, found, flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        result.setdefault("forward_diff", {})[str(dtype)] = found = forward_diff(dtype)
        print("tiny forward, calls whose row differs", dtype, found[:8], flush=True)
    loaded = random_model("smollm2-135m", torch.bfloat16)
    best, best_ms = None, float("inf")
    for config in picked:
        started = time.perf_counter()
        knobs, blocks = apply(config)
        rows, runner = pass_costs(loaded, args.context, args.iters, blocks)
        del runner
        entry = {"knobs": knobs, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
        result["configs"].append(entry)
        b1 = rows[0]["ms"]
        print(
            " ".join(f"{k}={v}" for k, v in knobs.items()),
            " ".join(f"B{r['batch']}T{r['width']}={r['ms']:.3f}" for r in rows),
            f"({entry['seconds']} s)",
            flush=True,
        )
        if b1 < best_ms:
            best, best_ms = config, b1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    _, blocks = apply(best)
    _, runner = pass_costs(loaded, args.context, 5, blocks)
    result["profile_best"] = profile_replay(runner, args.context, "graph", "invariant", top=20)
    result["best"] = dict(zip(KNOBS, best))
    ik.GEMV_MAX_ROWS, ik.ATTN_CHUNK, ik.ATTN_WARPS = defaults
    args.out.write_text(json.dumps(result, indent=1))
    print("best", result["best"], f"{best_ms:.3f} ms")


if __name__ == "__main__":
    main()
