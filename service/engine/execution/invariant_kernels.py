"""Triton kernels whose result for one token row does not depend on the other rows.

Why: a plain decode pass computes one row per sequence (T = 1); a verify pass computes
k + 1 rows. Library kernels pick their tiling, split-K and reduction order from the shape,
so the same row gets a slightly different sum in the two passes; in bfloat16 that flips
near-tied argmaxes, and speculative greedy output drifts from plain greedy output
(docs/engine.md). Here every reduction has an
order fixed by constants alone, never by the number of rows:

- linear, more rows than the caller's gemv limit (with the engine's auto limit, every pass
  of a model of hidden size 4096 and up): tiles of BM rows, the inner dimension walked in BK
  steps, one tl.dot per step accumulating in float32, optionally in SPLIT fixed ranges of K
  whose partials are added in range order. A row's sums are the same whether it is alone in
  its tile or one of BM, at any position (no split or block shape chosen from M);
- linear, up to the gemv limit: one program per row and BN outputs, each output a float32
  sum over BK-wide chunks of the inner dimension, chunks in order;
- attention: keys in fixed chunks of ATTN_CHUNK absolute positions (chunk c covers
  positions c * ATTN_CHUNK ..), one partial softmax per chunk, then a combine over a chunk
  axis padded to a length fixed by the cache size. Masked positions and chunks contribute
  exact zeros, so how many keys a pass reads (its kv bucket) changes nothing.
- norms: each row's sum of squares in fixed steps over the row, inside the linear that
  consumes it.

The two linear kernels round differently: a row's bits are the same in every pass of up to
the gemv limit, and in every pass of more rows, not across the two. The engine's limit
(EngineConfig.gemv_max_rows, linear_blocks.gemv_row_limit) is fixed per model: 0 (one kernel,
one rounding for every pass) from hidden size 4096 up by default.

The rounding points follow transformers' eager bfloat16 Llama: the norm's output, the
linears' outputs, each term of the rotary embedding and the attention probabilities are
rounded to the model dtype where transformers rounds them (float32 models: no rounding at
all, and float32 dots in full precision, not TF32).

Integer arguments that vary per pass (rows, tokens, kv length, the mask's strides) are
excluded from Triton's specialisation (`do_not_specialize`), and _gemv_kernel takes its row
from the grid: one compiled kernel serves every row count, so a single row and sixteen rows
run the same machine code.

Shapes: M token rows (B rows x T tokens, row m = b * T + t), E hidden size, H query heads,
G kv heads, D head dim, L cache length, K kv positions read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from service.engine.execution.linear_blocks import (
    GEMV_BLOCKS,
    GEMV_ROWS_SMALL_MODEL,
    TILE_BLOCKS,
    GemvBlocks,
    TileBlocks,
)

# Up to the gemv limit linears run as _gemv_kernel (CUDA cores, BN outputs of one row per
# program, sums over BK-wide chunks); above, as _linear_kernel (tensor cores, BM-row tiles).
# The limit is the caller's (`linear(gemv_max_rows=)`; the engine's per model from
# EngineConfig.gemv_max_rows); GEMV_MAX_ROWS is the default of direct calls (the block sweep,
# tests). The block shapes (GemvBlocks, TileBlocks) are chosen per weight shape by the caller
# (service/engine/execution/linear_blocks.py), never from the number of rows: a row's bits
# depend on them.
GEMV_MAX_ROWS = GEMV_ROWS_SMALL_MODEL  # 16
ATTN_ROWS = 16  # query rows (heads x tokens of one kv head) per attention program
ATTN_CHUNK = 64  # key positions per attention program
ATTN_WARPS = 4
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third axes
SUM_ROWS, SUM_COLS = 16, 128  # _split_sum_kernel's tile: a plain elementwise pass

# At most this many floats of attention partials at once (tokens x heads x chunks x (head
# dim + 2)); a long prefill runs its attention in slices of tokens.
_MAX_PARTIAL_FLOATS = 1 << 26

PROLOGUE_NONE, PROLOGUE_NORM, PROLOGUE_GATED = 0, 1, 2


@triton.jit(do_not_specialize=["M", "stride_ps"])
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    norm_ptr,
    res_ptr,
    out_ptr,
    part_ptr,
    M,
    eps,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    stride_ps,
    N: tl.constexpr,
    K: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_F32: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
    K_SPLIT: tl.constexpr,
):
    """out[M, N] = prologue(x) @ w[N, K]^T (+ bias) (+ res).

    PROLOGUE_NORM: rms_norm(x) * norm, as transformers' LlamaRMSNorm (x [M, K]).
    PROLOGUE_GATED: silu(x[:, :K]) * x[:, K:] (x [M, 2K], the fused gate/up output).

    SPLIT > 1: grid axis 2 is the inner range [s * K_SPLIT, (s + 1) * K_SPLIT) (K_SPLIT a
    multiple of BK); the program stores its float32 sums to part_ptr [SPLIT, M, N] (stride
    stride_ps = M * N between splits) and _split_sum_kernel finishes the output (bias,
    rounding, residual).
    """
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
    steps = tl.arange(0, BK)  # [BK]
    row_ok, col_ok = rows < M, cols < N
    x_rows = x_ptr + rows[:, None] * stride_xm  # [BM, 1]
    w_cols = w_ptr + cols[None, :] * stride_wn  # [1, BN]
    if PROLOGUE == 1:
        # Sum of squares of each row in fixed BK steps: [BM] float32.
        squares = tl.zeros([BM], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            ks = k0 + steps
            xv = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0).to(
                tl.float32
            )
            squares += tl.sum(xv * xv, axis=1)
        inv_rms = 1.0 / tl.sqrt(squares / K + eps)  # [BM]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if SPLIT == 1:
        k_lo = 0
    else:
        k_lo = tl.program_id(2) * K_SPLIT
    for k0 in range(k_lo, k_lo + K_SPLIT, BK):
        ks = k0 + steps
        k_ok = ks < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 2:
            gate = tl.load(x_rows + ks[None, :], mask=a_mask, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + ks[None, :], mask=a_mask, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu, rounded
            a = (silu * up).to(dtype)  # [BM, BK]
        elif PROLOGUE == 1:
            xv = tl.load(x_rows + ks[None, :], mask=a_mask, other=0.0).to(tl.float32)
            scale = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            normed = (xv * inv_rms[:, None]).to(dtype).to(tl.float32)  # x32 * rsqrt(var + eps), rounded
            a = (normed * scale[None, :]).to(dtype)  # weight * x, rounded
        else:
            a = tl.load(x_rows + ks[None, :], mask=a_mask, other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if SPLIT == 1:
        _finish_tile(
            acc,
            rows,
            cols,
            row_ok,
            col_ok,
            bias_ptr,
            res_ptr,
            out_ptr,
            stride_rm,
            stride_om,
            dtype,
            HAS_BIAS,
            HAS_RES,
            OUT_F32,
        )
    else:
        part = part_ptr + tl.program_id(2).to(tl.int64) * stride_ps + rows[:, None] * N + cols[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _finish_tile(
    acc,
    rows,
    cols,
    row_ok,
    col_ok,
    bias_ptr,
    res_ptr,
    out_ptr,
    stride_rm,
    stride_om,
    dtype: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_F32: tl.constexpr,
):
    """Stores a [rows, cols] tile of float32 sums as the linear's output: + bias, then float32
    out, or rounded to dtype (+ residual, rounded again)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if OUT_F32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        out = acc.to(dtype)
        if HAS_RES:  # x + linear(...): the linear's output rounded, then the sum rounded
            res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(out_ptrs, out, mask=out_mask)


@triton.jit(do_not_specialize=["M", "stride_ps"])
def _split_sum_kernel(
    part_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    stride_rm,
    stride_om,
    stride_ps,
    N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_F32: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """_linear_kernel's output from its SPLIT partials [SPLIT, M, N]: summed in range order
    (partial 0 + partial 1 + ...), a fixed order whatever M is. Grid (M / BM, N / BN)."""
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * N + cols[None, :]  # [BM, BN]
    acc = tl.load(part_ptr + offsets, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        split_base = part_ptr + stride_ps.to(tl.int64) * s  # int64: SPLIT x M x N may pass 2^31
        acc += tl.load(split_base + offsets, mask=mask, other=0.0)
    _finish_tile(
        acc,
        rows,
        cols,
        row_ok,
        col_ok,
        bias_ptr,
        res_ptr,
        out_ptr,
        stride_rm,
        stride_om,
        dtype,
        HAS_BIAS,
        HAS_RES,
        OUT_F32,
    )


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    norm_ptr,
    res_ptr,
    out_ptr,
    eps,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    N: tl.constexpr,
    K: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_F32: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """_linear_kernel's function for few rows, without tensor cores: grid (M, N / BN), BN
    outputs of one row per program, each a float32 sum of BK-wide products (tl.sum over a
    [BN, BK] tile), then over the BK chunks in order. Many small programs and no shared
    memory staging: at one to a few rows a pass is latency-bound, not arithmetic-bound.
    The row is the grid's first axis, so the M programs that read the same BN weight rows
    are launched together and all but the first can find them in L2 (docs/engine.md).
    PROLOGUE as _linear_kernel's."""
    dtype = x_ptr.dtype.element_ty
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
    col_ok = cols < N
    steps = tl.arange(0, BK)
    w_cols = w_ptr + cols[:, None] * stride_wn  # [BN, 1]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    m = tl.program_id(0)  # one row per program: the same code for a row whatever M is
    x_row = x_ptr + m * stride_xm
    if PROLOGUE == 1:
        squares = tl.zeros([BK], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            ks = k0 + steps
            xv = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
            squares += xv * xv
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        ks = k0 + steps
        k_ok = ks < K
        if PROLOGUE == 2:
            gate = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            a = (silu * up).to(dtype).to(tl.float32)  # [BK]
        elif PROLOGUE == 1:
            xv = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            scale = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = ((xv * inv_rms).to(dtype).to(tl.float32) * scale).to(dtype).to(tl.float32)
        else:
            a = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_cols + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    if HAS_BIAS:
        acc += bias
    out_ptrs = out_ptr + m * stride_om + cols
    if OUT_F32:
        tl.store(out_ptrs, acc, mask=col_ok)
    else:
        out = acc.to(dtype)
        if HAS_RES:
            res = tl.load(res_ptr + m * stride_rm + cols, mask=col_ok, other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(out_ptrs, out, mask=col_ok)


def check_gemv_grid(n: int, gemv: GemvBlocks) -> None:
    """_gemv_kernel puts a weight's N / BN column blocks on the grid's second axis: ValueError
    where they are more than CUDA allows there."""
    if triton.cdiv(n, gemv.bn) > MAX_GRID_Y:
        raise ValueError(
            f"a weight of {n} outputs in gemv blocks of {gemv.bn} needs {triton.cdiv(n, gemv.bn)} "
            f"programs on the grid's second axis, more than {MAX_GRID_Y}: give it a larger bn "
            "in the block table (--linear-blocks)"
        )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    out_float32: bool = False,
    gemv: GemvBlocks | None = None,
    tiles: TileBlocks | None = None,
    gemv_max_rows: int | None = None,
) -> torch.Tensor:
    """Row-invariant F.linear on x [M, K] (weight [N, K]): see _linear_kernel.

    norm: of rms_norm(x) * norm instead of x. gated: of silu(x[:, :K]) * x[:, K:] (x [M, 2K]).
    residual [M, N]: returns residual + linear(...). out_float32: float32 output, not rounded.
    gemv, tiles: the weight's block shapes (linear_blocks.BlockTable.for_weight; default
    GEMV_BLOCKS / TILE_BLOCKS). A row's bits change with them, so pick them from the weight's
    shape, never from M. gemv_max_rows: up to this many rows run on _gemv_kernel, more on
    _linear_kernel (default GEMV_MAX_ROWS); a model keeps one value for all its passes.
    """
    if x.dim() != 2 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("linear wants a 2-D x and weight with contiguous rows")
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"x has {x.shape[1]} columns, weight {k}{' (gated: 2x)' if gated else ''}")
    out = torch.empty((m, n), device=x.device, dtype=torch.float32 if out_float32 else x.dtype)
    if residual is not None and residual.stride(1) != 1:
        raise ValueError("residual rows must be contiguous")
    prologue = PROLOGUE_GATED if gated else PROLOGUE_NONE if norm is None else PROLOGUE_NORM
    # The two kernels take the same tensors, strides and prologue/epilogue flags.
    tensors = (
        x,
        weight,
        bias if bias is not None else x,
        norm if norm is not None else x,
        residual if residual is not None else x,
        out,
    )
    strides = (
        x.stride(0),
        weight.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
    )
    flags = dict(
        N=n,
        K=k,
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        OUT_F32=out_float32,
    )
    if m <= (GEMV_MAX_ROWS if gemv_max_rows is None else gemv_max_rows):
        g = gemv or GEMV_BLOCKS
        check_gemv_grid(n, g)
        _gemv_kernel[(m, triton.cdiv(n, g.bn))](
            *tensors, float(eps), *strides, **flags, BN=g.bn, BK=g.bk, num_warps=g.warps
        )
    else:
        t = tiles or TILE_BLOCKS
        k_split = triton.cdiv(triton.cdiv(k, t.bk), t.split) * t.bk  # whole BK steps per range
        # [SPLIT, M, N] float32 partials; none (out as a placeholder) without a split
        parts = torch.empty((t.split, m, n), device=x.device, dtype=torch.float32) if t.split > 1 else out
        _linear_kernel[(triton.cdiv(m, t.bm), triton.cdiv(n, t.bn), t.split)](
            *tensors,
            parts,
            m,
            float(eps),
            *strides,
            m * n,
            **flags,
            IEEE=x.dtype == torch.float32,
            BM=t.bm,
            BN=t.bn,
            BK=t.bk,
            SPLIT=t.split,
            K_SPLIT=k_split,
            num_warps=t.warps,
            num_stages=t.stages,
        )
        if t.split > 1:
            _split_sum_kernel[(triton.cdiv(m, SUM_ROWS), triton.cdiv(n, SUM_COLS))](
                parts,
                tensors[2],
                tensors[4],
                out,
                m,
                strides[2],
                strides[3],
                m * n,
                N=n,
                HAS_BIAS=bias is not None,
                HAS_RES=residual is not None,
                OUT_F32=out_float32,
                SPLIT=t.split,
                BM=SUM_ROWS,
                BN=SUM_COLS,
            )
    return out


@triton.jit
def _rotate(x_ptr, offsets, cos, sin, D: tl.constexpr):
    """The rotary embedding of the vectors at x_ptr + offsets[..., :] (last axis D), as
    transformers' x * cos + rotate_half(x) * sin, each product and the sum rounded."""
    dtype = x_ptr.dtype.element_ty
    d = tl.arange(0, D)
    x = tl.load(x_ptr + offsets + d).to(tl.float32)
    partner = tl.load(x_ptr + offsets + (d + D // 2) % D).to(tl.float32)
    rotated = tl.where(d < D // 2, -partner, partner)  # rotate_half(x) = cat(-x2, x1)
    return ((x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)


@triton.jit(do_not_specialize=["T"])
def _write_kv_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    k_ptr,
    v_ptr,
    T,
    stride_qkv,
    stride_cs,
    stride_cb,
    stride_cg,
    stride_cl,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
):
    """Rotates token row m's keys (kv head g) and writes keys and values into the cache
    at the row's write position. Grid (M, G)."""
    m, g = tl.program_id(0), tl.program_id(1)
    b = m // T
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + m * stride_cs + d).to(tl.float32)
    sin = tl.load(sin_ptr + m * stride_cs + d).to(tl.float32)
    key = _rotate(qkv_ptr, m * stride_qkv + (H + g) * D, cos, sin, D)
    value = tl.load(qkv_ptr + m * stride_qkv + (H + G + g) * D + d)
    slot = b * stride_cb + g * stride_cg + tl.load(pos_ptr + m) * stride_cl
    tl.store(k_ptr + slot + d, key)
    tl.store(v_ptr + slot + d, value)


# The mask's strides change with the pass's width and kv length: unspecialised, so that their
# divisibility cannot change the kernel's layouts (and with them a reduction's order).
@triton.jit(do_not_specialize=["T", "t0", "tn", "kv_len", "stride_mb", "stride_mt"])
def _attention_chunk_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    T,
    t0,
    tn,
    kv_len,
    scale,
    stride_qkv,
    stride_cs,
    stride_cb,
    stride_cg,
    stride_cl,
    stride_mb,
    stride_mt,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Partial attention of one chunk of keys for up to ROWS query rows of one kv head.

    Grid (B * G, row tiles, chunks). Query rows of (b, g) are r = t * R + j for tokens
    t0 <= t < t0 + tn and the R = H / G query heads j of kv head g. Writes, per query
    row (m * H + h) and chunk c: the chunk's max score, sum of exp(score - max) and the
    exp-weighted sum of values [D] (max = -inf, zeros where the chunk has no visible key).
    """
    dtype = qkv_ptr.dtype.element_ty
    R = H // G
    b, g = tl.program_id(0) // G, tl.program_id(0) % G
    chunk = tl.program_id(2)
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = r < tn * R
    t = t0 + r // R
    h = g * R + r % R
    m = b * T + t  # [ROWS] token rows
    d = tl.arange(0, D)
    cs = m[:, None] * stride_cs + d[None, :]
    cos = tl.load(cos_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_off = m[:, None] * stride_qkv + h[:, None] * D + d[None, :]  # [ROWS, D]
    q = tl.load(qkv_ptr + q_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_partner = tl.load(
        qkv_ptr + q_off - d[None, :] + ((d + D // 2) % D)[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    q_rotated = tl.where(d[None, :] < D // 2, -q_partner, q_partner)
    q = ((q * cos).to(dtype).to(tl.float32) + (q_rotated * sin).to(dtype).to(tl.float32)).to(dtype)
    keys_at = chunk * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] absolute positions
    key_ok = keys_at < kv_len
    kv_off = b * stride_cb + g * stride_cg + keys_at[:, None] * stride_cl + d[None, :]  # [CHUNK, D]
    keys = tl.load(k_ptr + kv_off, mask=key_ok[:, None], other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [ROWS, CHUNK]
    else:
        scores = tl.dot(q, tl.trans(keys))
    bias = tl.load(
        mask_ptr + b * stride_mb + t[:, None] * stride_mt + keys_at[None, :],
        mask=row_ok[:, None] & key_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    visible = bias > -1e30  # the mask's minimum (or -inf) hides a key
    scores = tl.where(visible, scores * scale + bias, float("-inf"))
    top = tl.max(scores, axis=1)  # [ROWS]
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    probs = tl.where(visible, tl.exp(scores - safe_top[:, None]), 0.0)  # [ROWS, CHUNK]
    total = tl.sum(probs, axis=1)
    values = tl.load(v_ptr + kv_off, mask=key_ok[:, None], other=0.0)
    if IEEE:
        acc = tl.dot(probs, values, input_precision="ieee")  # [ROWS, D]
    else:
        acc = tl.dot(probs.to(dtype), values)
    local = b * tn + t - t0  # token row within this slice of tokens
    part = (local * H + h) * tl.num_programs(2) + chunk  # [ROWS]
    tl.store(part_max_ptr + part, top, mask=row_ok)
    tl.store(part_sum_ptr + part, total, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["T", "t0", "tn", "chunks"])
def _attention_combine_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    out_ptr,
    T,
    t0,
    tn,
    chunks,
    stride_out,
    H: tl.constexpr,
    D: tl.constexpr,
    PADDED: tl.constexpr,
):
    """Combines the chunks of one query row in a fixed order, grid (B * tn, H): the chunk
    axis is padded to PADDED, a constant of the cache, whatever the pass's kv length, and
    chunks past the kv length or with no visible key weigh exactly 0."""
    dtype = out_ptr.dtype.element_ty
    local, h = tl.program_id(0), tl.program_id(1)  # local = b * tn + (t - t0)
    m = (local // tn) * T + t0 + local % tn  # token row
    c = tl.arange(0, PADDED)
    c_ok = c < chunks
    part = (local * H + h) * chunks + c  # [PADDED]
    d = tl.arange(0, D)
    tops = tl.load(part_max_ptr + part, mask=c_ok, other=float("-inf"))
    totals = tl.load(part_sum_ptr + part, mask=c_ok, other=0.0)
    accs = tl.load(
        part_acc_ptr + part[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0
    )  # [PADDED, D]
    top = tl.max(tops, axis=0)
    weights = tl.where(tops == float("-inf"), 0.0, tl.exp(tops - top))  # [PADDED]
    total = tl.sum(weights * totals, axis=0)
    out = tl.sum(weights[:, None] * accs, axis=0) / total  # [D]
    tl.store(out_ptr + m * stride_out + h * D + d, out.to(dtype))


def write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tokens: int,
    h: int,
    g: int,
    d: int,
) -> None:
    """Rotates the keys of qkv [M, (H + 2G) * D] and writes keys and values into k_cache,
    v_cache [B, G, L, D] at write_pos [B, T] (M = B * T, tokens = T); cos, sin [M, D]."""
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("key and value caches need one layout with contiguous head vectors")
    _write_kv_kernel[(qkv.shape[0], g)](
        qkv,
        cos,
        sin,
        write_pos.contiguous(),
        k_cache,
        v_cache,
        tokens,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        H=h,
        G=g,
        D=d,
        num_warps=1,
    )


def attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor,
    h: int,
    g: int,
    d: int,
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention of the (rotated) queries in qkv [M, (H + 2G) * D] over the
    cache k_cache, v_cache [B, G, L, D], positions 0 .. K - 1, with the additive mask
    [B, 1, T, K]. Returns [M, H * D] in the model dtype."""
    b, _, t, kv_len = mask.shape
    if mask.stride(3) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("attention wants a mask and caches with contiguous last dimensions")
    chunks = triton.cdiv(kv_len, ATTN_CHUNK)
    padded = triton.next_power_of_2(triton.cdiv(k_cache.shape[2], ATTN_CHUNK))
    out = torch.empty((b * t, h * d), device=qkv.device, dtype=qkv.dtype)
    per_slice = max(1, _MAX_PARTIAL_FLOATS // (b * h * chunks * (d + 2)))  # tokens per slice
    for t0 in range(0, t, per_slice):
        tn = min(per_slice, t - t0)
        parts = b * tn * h * chunks
        part_max = torch.empty(parts, device=qkv.device, dtype=torch.float32)
        part_sum = torch.empty(parts, device=qkv.device, dtype=torch.float32)
        part_acc = torch.empty((parts, d), device=qkv.device, dtype=torch.float32)
        grid = (b * g, triton.cdiv(tn * (h // g), ATTN_ROWS), chunks)
        _attention_chunk_kernel[grid](
            qkv,
            cos,
            sin,
            k_cache,
            v_cache,
            mask,
            part_max,
            part_sum,
            part_acc,
            t,
            t0,
            tn,
            kv_len,
            float(scale),
            qkv.stride(0),
            cos.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            mask.stride(0),
            mask.stride(2),
            H=h,
            G=g,
            D=d,
            ROWS=ATTN_ROWS,
            CHUNK=ATTN_CHUNK,
            IEEE=qkv.dtype == torch.float32,
            num_warps=ATTN_WARPS,
        )
        _attention_combine_kernel[(b * tn, h)](
            part_max,
            part_sum,
            part_acc,
            out,
            t,
            t0,
            tn,
            chunks,
            out.stride(0),
            H=h,
            D=d,
            PADDED=padded,
            num_warps=2,
        )
    return out
