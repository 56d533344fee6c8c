"""The "invariant" lean forward (Triton kernels): transformers' numbers, and a token row's
logits the same bits whatever else the pass computes (more tokens, more rows, a longer kv
read).

Runs on CUDA, or on a CPU machine with Triton's interpreter (TRITON_INTERPRET=1 set before
Triton is imported, Triton installed): there in float32 only, since the interpreter's
bfloat16 dot is wrong (checked with Triton 3.6). Skipped otherwise (CI has neither).

The interpreter runs tl.dot as numpy's matmul, and OpenBLAS's optimised sgemm kernels round a
row differently by its position in the block (Triton 3.9, an AMD EPYC: rows 6-15 of a
16-row attention block), which a GPU's MMA instructions do not. The bitwise tests therefore
need OpenBLAS's generic kernel in the interpreter: OPENBLAS_CORETYPE=Prescott, set before
numpy loads:

    TRITON_INTERPRET=1 OPENBLAS_CORETYPE=Prescott python -m pytest tests/engine/test_invariant_kernels.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.linear_blocks import DEFAULT_TABLE, BlockTable, GemvBlocks, TileBlocks
from service.engine.execution.model_forward import ModelForward, supports
from tests.support.float_compare import SHALLOW_BUDGET, assert_close_up_to_rounding

ON_CUDA = torch.cuda.is_available()
INTERPRETED = (
    not ON_CUDA
    and os.environ.get("TRITON_INTERPRET") == "1"
    and importlib.util.find_spec("triton") is not None
)
pytestmark = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED), reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)"
)
GENERIC_BLAS = os.environ.get("OPENBLAS_CORETYPE", "").lower() == "prescott"
bitwise = pytest.mark.skipif(
    INTERPRETED and not GENERIC_BLAS,
    reason="bit-for-bit in Triton's interpreter needs OPENBLAS_CORETYPE=Prescott (module docstring)",
)
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if ON_CUDA else [torch.float32]

# Head dim 16 (the kernels' smallest), and 96 positions: attention spans two key chunks.
SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MAX_LEN = 96
# Block shapes other than the defaults for every weight of the tiny model (qkv, o, gate/up,
# down, LM head): a row's bits must not depend on the rest of the pass with these either. The
# tiles split the inner dimension in two (K = 64: one BK step each; K = 160: 3 + 2 steps).
OTHER_TILES = TileBlocks(32, 32, 32, 4, 4, split=2)
OTHER_BLOCKS = BlockTable(
    {
        shape: (GemvBlocks(8, 32, 4), OTHER_TILES)
        for shape in ((128, 64), (64, 64), (320, 64), (64, 160), (300, 64))
    }
)


def _model(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, initializer_range=0.2))
    else:  # Qwen2: q/k/v biases, randomised so they matter
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, initializer_range=0.2))
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.5)
    return model.eval().to(DEVICE, dtype)


class _Rows:
    """A ModelForward over a cache of 4 rows, fed like the runner feeds it."""

    def __init__(self, lean: ModelForward, dtype: torch.dtype) -> None:
        self.lean = lean
        self.dtype = dtype
        self.cache = StaticKVCache(max_batch=4, max_len=MAX_LEN, device=DEVICE, dtype=dtype)
        self.cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)

    def __call__(
        self, lo: int, tokens: torch.Tensor, starts: list[int], kv_len: int | None = None
    ) -> torch.Tensor:
        b, t = tokens.shape
        keys, values = self.cache.rows(lo, lo + b)
        starts_t = torch.tensor(starts, device=DEVICE)
        positions = starts_t[:, None] + torch.arange(t, device=DEVICE)
        kv_len = kv_len or max(starts) + t
        return self.lean(
            tokens.to(DEVICE),
            positions,
            positions,
            causal_mask(starts_t, t, kv_len, self.dtype),
            keys,
            values,
        )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.inference_mode()
def test_matches_transformers(kind: str) -> None:
    model = _model(kind)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 80), generator=torch.Generator().manual_seed(1)).to(
        DEVICE
    )
    reference = model(ids).logits  # [3, 80, V], the full causal forward
    rows = _Rows(ModelForward(model, variant="invariant"), torch.float32)
    lengths = [70, 41, 66]  # ragged prefills, one row at a time, then 1 to 4 tokens a pass
    for r, n in enumerate(lengths):
        out = rows(r, ids[r : r + 1, :n], [0])
        assert_close_up_to_rounding(out[0], reference[r, :n])
    for width in (1, 4, 1, 2):
        chunk = torch.stack([ids[r, n : n + width] for r, n in enumerate(lengths)])
        out = rows(0, chunk, lengths, kv_len=MAX_LEN)
        for r, n in enumerate(lengths):
            assert_close_up_to_rounding(out[r], reference[r, n : n + width])
        lengths = [n + width for n in lengths]


@bitwise
@pytest.mark.parametrize("gemv_max_rows", [0, 16], ids=["tiles_only", "gemv_to_16"])
@pytest.mark.parametrize("blocks", [DEFAULT_TABLE, OTHER_BLOCKS], ids=["default_blocks", "other_blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_a_rows_logits_do_not_depend_on_the_rest_of_the_pass(
    dtype: torch.dtype, blocks: BlockTable, gemv_max_rows: int
) -> None:
    """Eight tokens one pass each (T = 1), then the same eight as one pass (T = 8), then four
    of them in a batch of three rows with a longer kv read: the same logits and cache
    contents, bit for bit. Passes of more than the gemv limit (the tensor-core linear) agree
    among themselves: 3 rows x 6 tokens against 3 rows x 8 tokens. With the limit 0 (what the
    engine's auto limit gives a model of hidden size 4096 and up) every pass runs on the tile
    kernel."""
    model = _model("llama", dtype)
    lean = ModelForward(model, variant="invariant", linear_blocks=blocks, gemv_max_rows=gemv_max_rows)
    if blocks is OTHER_BLOCKS:  # every weight took the table's shapes
        assert set(lean.linear_blocks.values()) == {(GemvBlocks(8, 32, 4), OTHER_TILES)}
    rows = _Rows(lean, dtype)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 60), generator=gen)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=gen)
    rows(0, prompt, [0])
    one_by_one = torch.cat([rows(0, tokens[:, i : i + 1], [60 + i]) for i in range(8)], dim=1)  # [1, 8, V]
    keys = [k[0].clone() for k in rows.cache.keys.values()]
    for k in rows.cache.keys.values():
        k[0, :, 60:].zero_()
    together = rows(0, tokens, [60])
    assert torch.equal(together, one_by_one)
    assert all(torch.equal(k[0], want) for k, want in zip(rows.cache.keys.values(), keys))
    others = torch.randint(0, SHAPE["vocab_size"], (2, 50), generator=gen)
    rows(1, others, [0, 0])
    batch = torch.cat([tokens[:, :4], torch.randint(0, SHAPE["vocab_size"], (2, 4), generator=gen)])
    mixed = rows(0, batch, [60, 50, 50], kv_len=MAX_LEN)
    assert torch.equal(mixed[0], one_by_one[0, :4])
    wide = torch.cat([tokens, torch.randint(0, SHAPE["vocab_size"], (2, 8), generator=gen)])  # [3, 8]
    assert 3 * 6 > gemv_max_rows
    six = rows(0, wide[:, :6], [60, 50, 50])
    eight = rows(0, wide, [60, 50, 50], kv_len=MAX_LEN)
    assert torch.equal(six, eight[:, :6])


def test_supports_only_what_the_tiles_cover() -> None:
    assert supports(LlamaForCausalLM(LlamaConfig(**SHAPE)), "invariant")
    odd = dict(SHAPE, hidden_size=96, num_attention_heads=4)  # head dim 24
    assert supports(LlamaForCausalLM(LlamaConfig(**odd))) and not supports(
        LlamaForCausalLM(LlamaConfig(**odd)), "invariant"
    )


# One case per committed table entry (the 8B layer weights); the norm prologue's form only.
@pytest.mark.skipif(not ON_CUDA, reason="the committed shapes are real model sizes: CUDA only")
@pytest.mark.parametrize("shape", sorted(DEFAULT_TABLE), ids=lambda shape: f"{shape[0]}x{shape[1]}")
@torch.inference_mode()
def test_every_committed_block_shape_keeps_a_row_alone(shape: tuple[int, int]) -> None:
    """Each weight shape of the committed table, with its blocks: a row's output bits in a pass
    of few rows equal its bits among many (the norm prologue, the form of qkv, gate/up and
    the LM head), for the gemv kernel (1 row against 9) and the tile kernel (1 row against 9,
    as the 8B shape's passes run with the gemv limit 0; 17 rows against 288, the row at
    another position)."""
    from service.engine.execution import invariant_kernels as ik

    n, k = shape
    gemv, tiles = DEFAULT_TABLE.for_weight(n, k)
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(288, k, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    norm = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).bfloat16()

    def linear(rows: torch.Tensor, gemv_max_rows: int = ik.GEMV_MAX_ROWS) -> torch.Tensor:
        return ik.linear(
            rows, weight, norm=norm, eps=1e-5, gemv=gemv, tiles=tiles, gemv_max_rows=gemv_max_rows
        )

    assert torch.equal(linear(x[:1])[0], linear(x[:9])[0])
    assert torch.equal(linear(x[:1], 0)[0], linear(x[:9], 0)[0])  # the tile kernel at 1 and 9 rows
    x[200] = x[5]
    assert torch.equal(linear(x[:17])[5], linear(x)[200])


@pytest.mark.parametrize("gemv_max_rows", [0, 16], ids=["tiles_only", "gemv_to_16"])
@torch.inference_mode()
def test_the_forward_runs_each_weight_on_its_tables_blocks(gemv_max_rows: int) -> None:
    """The same 8-token pass on the default blocks and on OTHER_BLOCKS: the same numbers up to
    rounding, but not the same bits, so the table's blocks reached the kernels. On the gemv
    kernel every inner dimension (64 or 160) is summed as one chunk of the default's 256
    and in chunks of the table's 32; on the tile kernel the table splits it in two ranges
    whose partial sums are added last. (BK alone would not show on the tile kernel in
    float32 on a GPU: its IEEE dot multiply-adds in K order into one accumulator whatever
    BK is; a 40-row pass gave equal bits on an H100, 2026-12-07.)"""
    model = _model("llama", torch.float32)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))

    def run(blocks: BlockTable) -> torch.Tensor:
        lean = ModelForward(model, variant="invariant", linear_blocks=blocks, gemv_max_rows=gemv_max_rows)
        return _Rows(lean, torch.float32)(0, prompt, [0])

    default, other = run(DEFAULT_TABLE), run(OTHER_BLOCKS)
    assert not torch.equal(default, other)
    assert_close_up_to_rounding(other, default)


@bitwise
@pytest.mark.parametrize("form", ["plain", "norm", "gated", "bias_residual", "float32_out"])
@torch.inference_mode()
def test_a_split_inner_dimension_gives_the_same_numbers_and_keeps_a_row_alone(form: str) -> None:
    """The tile kernel with its inner dimension in 3 ranges (K = 200: 7 BK steps, 3 + 3 + 1,
    the last step partly past K): the unsplit kernel's numbers up to rounding (the partial
    sums are added in another order), and a row's bits the same among 17 rows as among 40
    at another position."""
    from service.engine.execution import invariant_kernels as ik

    gen = torch.Generator().manual_seed(11)
    n, k = 72, 200
    x = torch.randn(40, 2 * k if form == "gated" else k, generator=gen).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) * 0.1).to(DEVICE)
    extra = dict(
        plain={},
        norm=dict(norm=(1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE), eps=1e-5),
        gated=dict(gated=True),
        bias_residual=dict(
            bias=torch.randn(n, generator=gen).to(DEVICE),
            residual=torch.randn(40, n, generator=gen).to(DEVICE),
        ),
        float32_out=dict(out_float32=True),
    )[form]

    def linear(rows: torch.Tensor, split: int) -> torch.Tensor:
        args = dict(extra)
        if "residual" in args:
            args["residual"] = args["residual"][: rows.shape[0]]
        return ik.linear(rows, weight, tiles=TileBlocks(32, 32, 32, 4, 4, split=split), **args)

    whole, split = linear(x, 1), linear(x, 3)
    assert_close_up_to_rounding(split, whole, budget=SHALLOW_BUDGET)
    x[30] = x[5]
    if "residual" in extra:
        extra["residual"][30] = extra["residual"][5]
    assert torch.equal(linear(x[:17], 3)[5], linear(x, 3)[30])


def test_a_weight_too_wide_for_the_gemv_grid_is_refused() -> None:
    """The gemv kernel's column blocks are on CUDA's second grid axis (at most 65,535): a
    weight that needs more is refused by name when the forward is built, not mid-pass."""
    from service.engine.execution import invariant_kernels as ik

    ik.check_gemv_grid(65535 * 4, GemvBlocks(4, 256, 4))
    with pytest.raises(ValueError, match="larger bn"):
        ik.check_gemv_grid(65535 * 4 + 1, GemvBlocks(4, 256, 4))
