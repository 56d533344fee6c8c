"""The elementwise steps of a dense prefill layer (service/engine/execution/dense_prefill.py) as one
Triton kernel each: an RMS norm, the rotary embedding with the cache write, the SiLU
product. Eagerly, each of these is several torch kernels with float32 intermediates in
memory; at prefill sizes they took about a third of a layer's time next to its cuBLAS
products (docs/prefill.md). Each rounds where transformers' bfloat16 Llama rounds (as
service/engine/execution/invariant_kernels.py does): the norm's output before and after the weight,
each rotary term and their sum, the SiLU and the product.

Shapes: N token rows, E hidden, H query heads, G kv heads, D head dim, I intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps, E: tl.constexpr, BLOCK: tl.constexpr):
    """One row: x * rsqrt(mean(x^2) + eps) in float32, rounded, times the weight, rounded."""
    dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < E
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / E + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(dtype), mask=ok)


@triton.jit
def _rotary_write_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    rows_ptr,
    pos_ptr,
    k_ptr,
    v_ptr,
    stride_qkv,
    stride_cs,
    stride_cb,
    stride_cg,
    stride_cl,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
):
    """Grid (N, H + G). Head h < H: rotates token n's query head in place. Head H + g:
    rotates its key head g and writes it, and value head g, to cache row rows[n] at
    position pos[n]."""
    dtype = qkv_ptr.dtype.element_ty
    n, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + n * stride_cs + d).to(tl.float32)
    sin = tl.load(sin_ptr + n * stride_cs + d).to(tl.float32)
    base = qkv_ptr + n * stride_qkv + h * D
    x = tl.load(base + d).to(tl.float32)
    partner = tl.load(base + (d + D // 2) % D).to(tl.float32)
    rotated = tl.where(d < D // 2, -partner, partner)  # rotate_half(x) = cat(-x2, x1)
    out = ((x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
    if h < H:
        tl.store(base + d, out)  # this program has read the whole head vector already
    else:
        g = h - H
        slot = tl.load(rows_ptr + n) * stride_cb + g * stride_cg + tl.load(pos_ptr + n) * stride_cl
        tl.store(k_ptr + slot + d, out)
        tl.store(v_ptr + slot + d, tl.load(qkv_ptr + n * stride_qkv + (H + G + g) * D + d))


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_gu, stride_o, I: tl.constexpr, BLOCK: tl.constexpr):  # noqa: E741 - I as in the legend
    """silu(gate) * up for one row's block of the fused [gate | up] output, as F.silu(gate) * up."""
    dtype = gate_up_ptr.dtype.element_ty
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(gate_up_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu + I + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch_layer.rms_norm of x [N, E] (contiguous rows)."""
    n, e = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(e)
    _rms_norm_kernel[(n,)](
        x,
        weight,
        out,
        x.stride(0),
        out.stride(0),
        float(eps),
        E=e,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out


def rotary_and_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    h: int,
    g: int,
    d: int,
) -> None:
    """Rotates the queries of qkv [N, (H + 2G) * D] in place and writes rotated keys and the
    values to k_cache, v_cache [B, G, L, D] at (rows[n], positions[n]); cos, sin [N, D]."""
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or qkv.stride(1) != 1:
        raise ValueError("rotary_and_write wants contiguous head vectors and one cache layout")
    _rotary_write_kernel[(qkv.shape[0], h + g)](
        qkv,
        cos,
        sin,
        rows,
        positions,
        k_cache,
        v_cache,
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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] for gate_up [N, 2I]: [N, I]."""
    n, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n, i), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(i, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), I=i, BLOCK=block, num_warps=4
    )
    return out
