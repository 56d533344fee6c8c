"""The decoder layer of the Llama / Qwen2 family as explicit torch code: the "around_attention"
and "layer" variants of ModelForward (service/engine/execution/model_forward.py), and the
Dynamo settings under which a compiled layer runs.

Shapes: B rows, T new tokens per row, K cached positions read, H query heads, G kv heads,
D head dim, E hidden size, I intermediate size.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch._dynamo
import torch.fx.experimental._config
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, D]; cos, sin: [B, 1, T, D]. rotate_half(x) = cat(-x2, x1).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pre_attention(
    x: torch.Tensor,
    norm: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    h: int,
    g: int,
    d: int,
    gemv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, E] -> rotated q [B, H, T, D], rotated k [B, G, T, D], v [B, G, T, D].
    gemv: the QKV projection as gemv_linear (B = T = 1, compiled)."""
    b, t, _ = x.shape
    if gemv:
        qkv = gemv_linear(x, qkv_weight, qkv_bias, norm, eps)
    else:
        qkv = F.linear(rms_norm(x, norm, eps), qkv_weight, qkv_bias)  # [B, T, (H + 2G) * D]
    q, k, v = qkv.view(b, t, h + 2 * g, d).transpose(1, 2).split((h, g, g), dim=1)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    norm: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Residual stream x [B, T, E] after attention output attn [B, H, T, D] and the MLP."""
    b, _, t, _ = attn.shape
    return out_proj_and_mlp(
        x, attn.transpose(1, 2).reshape(b, t, -1), o_weight, o_bias, norm, gate_up_weight, down_weight, eps
    )


def out_proj_and_mlp(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    norm: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
    gemv: bool = False,
) -> torch.Tensor:
    """Residual stream x [B, T, E] after attention output attn [B, T, H * D] and the MLP.
    gemv: the projections as gemv_linear (B = T = 1, compiled), gate and up as two
    reductions over one index space, so that inductor fuses both and the SiLU product."""
    if not gemv:
        x = x + F.linear(attn, o_weight, o_bias)
        gate, up = F.linear(rms_norm(x, norm, eps), gate_up_weight).chunk(2, dim=-1)  # [B, T, I] each
        return x + F.linear(F.silu(gate) * up, down_weight)
    x = x + gemv_linear(attn, o_weight, o_bias)
    gate_weight, up_weight = gate_up_weight.chunk(2, dim=0)  # two reductions over one index space
    gate, up = gemv_linear(x, gate_weight, None, norm, eps), gemv_linear(x, up_weight, None, norm, eps)
    return x + gemv_linear(F.silu(gate) * up, down_weight, None)


def gemv_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x [1, 1, E] as a product and a float32 sum, which
    inductor generates as a Triton reduction (fusable with what surrounds it) instead of an
    extern cuBLAS GEMV. The output is rounded to x's dtype, as F.linear's is.

    With norm, of rms_norm(x, norm, eps) instead of x: the norm is computed once per output
    row (x is a single row of E values), so that its own reduction over E has the GEMV's
    index space and inductor fuses both into one kernel, as it fuses a softmax's max and sum.
    """
    n, e = weight.shape
    rows = x[..., None, :]  # [1, 1, 1, E]
    if norm is not None:
        rows = rms_norm(rows.expand(*x.shape[:-1], n, e), norm, eps)  # [1, 1, N, E]
    out = (rows.float() * weight.float()).sum(-1)  # [1, 1, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Grouped-query attention as plain matmuls and a softmax, without repeating k and v.

    q [B, H, T, D]; k, v [B, G, K, D]; mask [B, 1, T, K] additive. Returns [B, T, H * D].
    Query heads j * R .. j * R + R - 1 (R = H / G) read kv head j, as transformers'
    repeat_kv does: q is viewed as [B, G, R * T, D], one matmul per kv head. The scores
    are scaled, masked and softmaxed in float32 (as transformers' eager attention), the
    probabilities cast back to the value dtype for the second matmul.
    """
    b, h, t, d = q.shape
    g = k.shape[1]
    r = h // g
    scores = torch.matmul(q.reshape(b, g, r * t, d), k.transpose(-1, -2))  # [B, G, R * T, K]
    scores = scores.view(b, g, r, t, -1).float() * scale + mask[:, :, None]  # [B, G, R, T, K]
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(b, g, r * t, -1)
    out = torch.matmul(probs, v)  # [B, G, R * T, D]
    return out.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


def decoder_layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_pos: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_norm: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    post_norm: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
    h: int,
    g: int,
    d: int,
    scale: float,
) -> torch.Tensor:
    """One whole decoder layer: x [B, T, E] -> x [B, T, E], writing this layer's new keys and
    values into k_cache, v_cache [B, G, L, D] (in place) at positions write_pos [B, T] and
    attending over the first K = mask.shape[-1] cached positions (mask [B, 1, T, K]).

    Written to be compiled as one region (ModelForward's "layer" variant), where B == 1 and
    T == 1 are specialisations of their own (Dynamo's 0/1 specialisation), so the choices
    below cost nothing at run time. Each choice was the fastest measured (docs/engine.md):
    - attention: the explicit matmuls of gqa_attention where B >= 2 and T >= 2,
      F.scaled_dot_product_attention otherwise;
    - linears at B = 1, T = 1, compiled: products and float32 sums (gemv_linear), which
      inductor fuses with the norm, SiLU and residual around them, instead of cuBLAS GEMVs.
    Eagerly, the linears stay F.linear (a product would be materialised).
    """
    b, t, _ = x.shape
    torch._check(k_cache.shape[1] == g and v_cache.shape[1] == g)  # fixes G for the compiler too
    gemv = b == 1 and t == 1 and torch.compiler.is_compiling()
    q, k, v = pre_attention(x, input_norm, qkv_weight, qkv_bias, cos, sin, eps, h, g, d, gemv)
    rows = torch.arange(b, device=x.device)[:, None, None]  # [B, 1, 1]
    heads = torch.arange(g, device=x.device)[None, :, None]  # [1, G, 1]
    slots = write_pos[:, None, :]  # [B, 1, T]
    k_cache.index_put_((rows, heads, slots), k)  # k, v: [B, G, T, D]
    v_cache.index_put_((rows, heads, slots), v)
    kv_len = mask.shape[-1]
    keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    if b != 1 and t != 1:
        attn = gqa_attention(q, keys, values, mask, scale)  # [B, T, H * D]
    else:
        attn = (
            F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=h != g)
            .transpose(1, 2)
            .reshape(b, t, h * d)
        )
    return out_proj_and_mlp(x, attn, o_weight, o_bias, post_norm, gate_up_weight, down_weight, eps, gemv)


def bind_layer(eps: float, h: int, g: int, d: int, scale: float) -> Callable[..., torch.Tensor]:
    """decoder_layer with the model's constants bound, as a function with a code object of its own.

    Dynamo keeps its compiled specialisations, and counts them against its recompile limit,
    per code object: a target and a draft model compiling the same function would otherwise
    share one cache and one limit. (The constants, closure values, are still frame inputs
    to Dynamo: compile_settings makes it specialise on them.)
    """

    def layer(
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_pos: torch.Tensor,
        mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        input_norm: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        o_weight: torch.Tensor,
        o_bias: torch.Tensor | None,
        post_norm: torch.Tensor,
        gate_up_weight: torch.Tensor,
        down_weight: torch.Tensor,
    ) -> torch.Tensor:
        return decoder_layer(
            x,
            cos,
            sin,
            write_pos,
            mask,
            k_cache,
            v_cache,
            input_norm,
            qkv_weight,
            qkv_bias,
            o_weight,
            o_bias,
            post_norm,
            gate_up_weight,
            down_weight,
            eps,
            h,
            g,
            d,
            scale,
        )

    return types.FunctionType(
        layer.__code__.replace(), layer.__globals__, layer.__name__, layer.__defaults__, layer.__closure__
    )


# Specialisations of one compiled layer function: B == 1 or >= 2, T == 1 or >= 2, and the
# cache rows' storage offset 0 (rows from 0, every graph) or not (an eager pass over rows
# [lo, hi) with lo > 0), and a kv length of 1 (an eager prefill of a one-token prompt): about
# 8. The limit leaves room above that; past it Dynamo would silently run the function
# eagerly, and we raise instead.
_RECOMPILE_LIMIT = 16


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Dynamo settings for calls of a compiled layer function (a compile happens inside a
    call), set for the duration of one pass rather than process-wide.

    - No duck sizing: dims of equal size would otherwise share one symbol (B == T == 2, or
      K == a batch of 64), and a later call where they differ would recompile.
    - Python ints and floats (head counts, eps, scale) are constants, not symbols or tensor
      inputs as dynamic=True would make them: the kernels see fixed head shapes.
    - A hard error, not a silent eager fallback, when the recompile limit is hit.
    """
    fx_config, dynamo_config = torch.fx.experimental._config, torch._dynamo.config
    settings = (
        (fx_config, "use_duck_shape", False),
        (dynamo_config, "specialize_int", True),
        (dynamo_config, "specialize_float", True),
        (dynamo_config, "recompile_limit", _RECOMPILE_LIMIT),
        (dynamo_config, "fail_on_recompile_limit_hit", True),
    )
    saved = [getattr(module, name) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), value in zip(settings, saved):
            setattr(module, name, value)
