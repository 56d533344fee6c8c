"""A lean forward pass for the Llama / Qwen2 family, over the engine's static KV cache.

transformers' own forward is correct but dispatch-bound (docs/engine.md). This module runs the
same math as explicit tensor code with fused projections: one QKV matmul and one gate/up
matmul per layer. Weights and config still come from the transformers model; the fused
matrices are built once and the model's own Linear weights become views into them, so no
weight is stored twice and the transformers forward keeps working (tests compare the two).

Shapes: B rows, T new tokens per row, K cached positions read, H query heads, G kv heads,
D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch._dynamo
import torch.nn.functional as F

from service.engine.execution.device import to_device
from service.engine.execution.linear_blocks import DEFAULT_TABLE, BlockTable, gemv_row_limit
from service.engine.execution.torch_layer import (
    bind_layer,
    compile_settings,
    post_attention,
    pre_attention,
    rms_norm,
)

if TYPE_CHECKING:
    from service.engine.execution.dense_prefill import PackedRows

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
VARIANTS = ("around_attention", "layer", "invariant")  # see ModelForward


def supports(model: torch.nn.Module, variant: str = "around_attention") -> bool:
    """True when `model` is a family this forward reproduces exactly (in `variant`)."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False  # Qwen2 sliding-window layers need their own mask
    if getattr(config, "mlp_bias", False) or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if variant == "invariant":  # the kernels' tiles: head dims of a power of two, at least 16
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim < 16 or head_dim & (head_dim - 1) or heads % config.num_key_value_heads:
            return False
    return True


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [E]
    qkv_weight: torch.Tensor  # [(H + 2G) * D, E]
    qkv_bias: torch.Tensor | None  # [(H + 2G) * D]
    o_weight: torch.Tensor  # [E, H * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [E]
    gate_up_weight: torch.Tensor  # [2 * I, E]
    down_weight: torch.Tensor  # [E, I]

    def linear_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along the output dimension and make
    each Linear's parameters views into the fused tensors (no second copy of any weight)."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat(
            [
                lin.bias.detach()
                if lin.bias is not None
                else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
                for lin in linears
            ]
        )
    row = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = torch.nn.Parameter(weight[row : row + rows], requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
    return weight, bias


class ModelForward:
    """The decoder stack of a Llama/Qwen2 model as explicit tensor code.

    Two variants (`variant`), the same numbers (tests compare both to transformers):
    - "around_attention": per layer, compile=True fuses the work before attention (norm, QKV,
      rotary) and after it (O projection, residuals, norm, MLP) with torch.compile (CUDA);
      the cache write and the attention (F.scaled_dot_product_attention) stay eager, so
      compile never sees the cache.
    - "layer": the whole decoder layer is one function (torch_layer.py's `decoder_layer`): cache write by
      index_put_ into the cache tensors, attention as explicit grouped-query matmuls
      (`gqa_attention`) or SDPA, whichever was measured faster for the shape. compile=True
      compiles it as one region (torch.compile, dynamic shapes, one specialisation per
      B == 1 or not, T == 1 or not, cache rows at offset 0 or not, never per kv length), so
      inductor fuses across the attention, writes the cache in place, and at B = T = 1 turns
      the linears into Triton reductions fused with their neighbours.
    - "invariant" (CUDA only): no torch.compile; every layer is seven Triton kernels whose
      result for a token row does not depend on the other rows of the pass
      (service/engine/execution/invariant_kernels.py), so a verify pass of k + 1 rows gives each row
      bit for bit the logits a plain pass of one row gives, in bfloat16 too: speculative
      greedy output is plain greedy output.
    In the first two variants the final norm and the LM head run in float32: bfloat16 logits
    are so coarse (about 0.1 apart near 20) that ties between the top two tokens are common,
    and which one wins then depends on tiny shape-dependent rounding upstream. The invariant
    variant keeps transformers' rounding (norm output in the model dtype) and accumulates
    the logits in float32: with no shape-dependent rounding, a tie goes the same way in
    every pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        compile: bool = False,
        variant: str = "around_attention",
        dense_prefill: str = "auto",
        linear_blocks: BlockTable = DEFAULT_TABLE,
        gemv_max_rows: int | None = None,
    ) -> None:
        """linear_blocks: the invariant kernels' block shape per weight shape
        (service/engine/execution/linear_blocks.py); resolved once for this model's weights.
        gemv_max_rows: the invariant variant's linears in passes of up to this many token rows
        run on the gemv kernel, larger ones on the tile kernel (EngineConfig.gemv_max_rows;
        None: linear_blocks.gemv_row_limit's rule for this model, at batch-1 width 1; the
        ModelRunner resolves it with its widest pass)."""
        if gemv_max_rows is not None and gemv_max_rows < 0:
            raise ValueError(f"gemv_max_rows must be >= 0, not {gemv_max_rows}")
        if not supports(model, variant):
            raise ValueError(
                f"lean forward ({variant}) does not support this {model.config.model_type!r} model"
            )
        if variant not in VARIANTS:
            raise ValueError(f"unknown lean forward variant {variant!r} (one of {', '.join(VARIANTS)})")
        self.variant = variant
        self.compiled = compile
        self.gemv_max_rows = gemv_row_limit(gemv_max_rows, model.config.hidden_size, max_width=1)
        config = model.config
        decoder = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.embed = decoder.embed_tokens.weight  # [V, E]
        head = model.lm_head.weight  # [V, E] (tied to embed when the model ties them)
        if variant == "invariant":
            from service.engine.execution import invariant_kernels  # Triton: CUDA machines only

            self._kernels = invariant_kernels
            self.final_norm, self.lm_head = decoder.norm.weight, head  # model dtype
        else:
            self.final_norm = decoder.norm.weight.float()  # [E]
            self.lm_head = head if head.dtype == torch.float32 else head.float()
        self.pre_attention = pre_attention
        self.post_attention = post_attention
        self.layer: Callable[..., torch.Tensor] | None = None  # the "layer" variant's function
        self._layer_code: types.CodeType | None = None  # its code object, when compiled
        if compile and variant == "around_attention":
            self.pre_attention = torch.compile(pre_attention, dynamic=True)
            self.post_attention = torch.compile(post_attention, dynamic=True)
        self.rotary = decoder.rotary_emb
        # Prefill passes (prefill()) of a half-precision model on a GPU with FlashAttention:
        # cuBLAS and FlashAttention (service/engine/execution/dense_prefill.py) instead of the invariant
        # kernels, which are written for decode-sized passes. Only with the invariant variant,
        # whose decode passes read a cache that any prefill may have written.
        # dense_prefill: "auto" (where available), "off", or "on" (forced: tests run it on
        # Triton's interpreter, with the reference attention off CUDA).
        if dense_prefill not in ("auto", "on", "off"):
            raise ValueError(f"dense_prefill must be auto, on or off, not {dense_prefill!r}")
        self._dense = None
        if dense_prefill != "off" and variant == "invariant":
            from service.engine.execution import dense_prefill as dense

            if dense_prefill == "on" or dense.available(self.embed.device, self.embed.dtype, self.head_dim):
                self._dense = dense
        self.layers: list[_Layer] = []
        for block in decoder.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_weight, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_weight, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    input_norm=block.input_layernorm.weight,
                    qkv_weight=qkv_weight,
                    qkv_bias=qkv_bias,
                    o_weight=attn.o_proj.weight,
                    o_bias=attn.o_proj.bias,
                    post_norm=block.post_attention_layernorm.weight,
                    gate_up_weight=gate_up_weight,
                    down_weight=mlp.down_proj.weight,
                )
            )
        if variant == "layer":
            layer = bind_layer(self.eps, self.num_heads, self.num_kv_heads, self.head_dim, self.scale)
            self.layer = layer
            if compile:
                for weights in self.layers:  # shapes of weights never change: no symbols for them
                    for weight in vars(weights).values():
                        if weight is not None:
                            torch._dynamo.mark_static(weight)
                # No split reductions: the reductions of a B = 1 pass (GEMVs, norms) have few
                # rows, and inductor would otherwise split them in two kernels for parallelism.
                self.layer = torch.compile(layer, dynamic=True, options={"split_reductions": False})
                self._layer_code = layer.__code__
        # The invariant kernels' block shapes of each weight, by the weight's shape alone (never
        # by a pass's row count); resolved for every variant, used by "invariant".
        weights = [self.lm_head] + [w for layer in self.layers for w in layer.linear_weights()]
        self.linear_blocks = linear_blocks.for_weights((w.shape[0], w.shape[1]) for w in weights)
        if variant == "invariant" and self.gemv_max_rows:  # a weight the gemv kernel cannot launch fails here
            for (n, _), (gemv, _) in self.linear_blocks.items():
                self._kernels.check_gemv_grid(n, gemv)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def compiled_graphs(self) -> int:
        """How many specialisations of the compiled layer function exist (0 unless the "layer"
        variant is compiled): one per (B == 1 or not, T == 1 or not, cache rows at offset 0 or
        not) seen so far; more means shapes recompile that should not."""
        if self._layer_code is None:
            return 0
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(self._layer_code))

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        positions: torch.Tensor,  # [B, T] long, rotary positions
        write_pos: torch.Tensor,  # [B, T] long, cache slot of each new token
        mask: torch.Tensor,  # [B, 1, T, K] additive, in the model dtype
        keys: list[torch.Tensor],  # per layer [B, G, L, D] (views of the cache rows)
        values: list[torch.Tensor],  # per layer [B, G, L, D]
        last_only: bool = False,
        last_at: torch.Tensor | None = None,  # [B] long: with last_only, each row's token (default T - 1)
    ) -> torch.Tensor:
        b, t = input_ids.shape
        kv_len = mask.shape[-1]
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(input_ids, self.embed)  # [B, T, E]
        cos, sin = self.rotary(x, positions)  # [B, T, D] each
        if self.variant == "invariant":
            return self._invariant_forward(x, cos, sin, write_pos, mask, keys, values, last_only, last_at)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, T, D]
        if self.variant == "layer":
            with compile_settings() if self.compiled else contextlib.nullcontext():
                for layer, k_cache, v_cache in zip(self.layers, keys, values):
                    x = self.layer(
                        x,
                        cos,
                        sin,
                        write_pos,
                        mask,
                        k_cache,
                        v_cache,
                        layer.input_norm,
                        layer.qkv_weight,
                        layer.qkv_bias,
                        layer.o_weight,
                        layer.o_bias,
                        layer.post_norm,
                        layer.gate_up_weight,
                        layer.down_weight,
                    )
            return self._logits(x, last_only, last_at)
        index = write_pos[:, None, :, None].expand(b, g, t, d)  # [B, G, T, D]
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            q, k, v = self.pre_attention(
                x, layer.input_norm, layer.qkv_weight, layer.qkv_bias, cos, sin, self.eps, h, g, d
            )
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            attn = F.scaled_dot_product_attention(
                q,
                k_cache[:, :, :kv_len],
                v_cache[:, :, :kv_len],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=h != g,
            )  # [B, H, T, D]
            x = self.post_attention(
                x,
                attn,
                layer.o_weight,
                layer.o_bias,
                layer.post_norm,
                layer.gate_up_weight,
                layer.down_weight,
                self.eps,
            )
        return self._logits(x, last_only, last_at)

    @property
    def dense_prefill(self) -> bool:
        """True when prefill() runs on cuBLAS and FlashAttention (else it is __call__)."""
        return self._dense is not None

    def prefill(
        self,
        input_ids: torch.Tensor,
        starts: list[int],
        lengths: list[int],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """A prefill pass: row b's tokens input_ids[b, :lengths[b]] ([B, T], the rest padding)
        go to cache positions starts[b] .. starts[b] + lengths[b] - 1 and see the row's cache
        below starts[b]. Returns float32 logits [B, 1, V] of each row's last real token.
        Needs dense_prefill; padding tokens are neither computed nor written."""
        dense = self._dense
        if dense is None:
            raise RuntimeError(
                "prefill() needs the dense prefill (a half-precision model on a GPU with FlashAttention)"
            )
        t = input_ids.shape[1]
        cache_len = keys[0].shape[2]
        packed = dense.pack(starts, lengths, t, cache_len, input_ids.device)
        starts_t = to_device(starts, torch.long, input_ids.device)
        positions = (starts_t[:, None] + torch.arange(t, device=input_ids.device)).view(-1)[
            packed.token_index
        ]  # [N]
        write_rows = packed.token_index // t  # [N]
        write_pos = positions.clamp(max=cache_len - 1)
        tokens = input_ids.reshape(-1)[packed.token_index]  # [N]
        return self.prefill_packed(tokens, positions, packed, write_rows, write_pos, keys, values)

    def prefill_packed(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        packed: PackedRows,
        write_rows: torch.Tensor,
        write_pos: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """The dense prefill over packed tokens [N] at rotary positions [N], token n's key and
        value written at (write_rows[n], write_pos[n]) of keys / values (per layer [R, G, L, D]),
        attention as `packed` (dense_prefill.PackedRows) says: float32 logits [B, 1, V] of the
        tokens packed.last [B]. No device synchronisation (a captured graph runs it:
        prefill_graphs.py)."""
        dense = self._dense
        h, g, d, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        x = F.embedding(tokens, self.embed)  # [N, E]
        cos, sin = self.rotary(x[None], positions[None])  # [1, N, D] each
        cos, sin = cos[0].to(x.dtype).contiguous(), sin[0].to(x.dtype).contiguous()  # [N, D]
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            x = dense.layer(
                x, cos, sin, packed, write_rows, write_pos, k_cache, v_cache, layer, eps, h, g, d, self.scale
            )
        rows = x[packed.last]  # [B, E]
        logits = self._linear(rows, self.lm_head, norm=self.final_norm, eps=eps, out_float32=True)
        return logits[:, None]  # [B, 1, V] float32

    def _invariant_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_pos: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        last_only: bool,
        last_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """The "invariant" variant: per layer seven row-invariant kernels (norm + QKV, rotary +
        cache write, attention over key chunks, combine, O + residual, norm + gate/up,
        SiLU product + down + residual)."""
        kernels, linear, (b, t, e) = self._kernels, self._linear, x.shape
        h, g, d, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        x = x.reshape(b * t, e)  # [M, E], token row m = b * T + t
        cos = cos.to(x.dtype).reshape(b * t, d).contiguous()  # [M, D]
        sin = sin.to(x.dtype).reshape(b * t, d).contiguous()
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            qkv = linear(x, layer.qkv_weight, layer.qkv_bias, norm=layer.input_norm, eps=eps)
            kernels.write_kv(qkv, cos, sin, write_pos, k_cache, v_cache, t, h, g, d)
            attn = kernels.attention(qkv, cos, sin, k_cache, v_cache, mask, h, g, d, self.scale)  # [M, H * D]
            x = linear(attn, layer.o_weight, layer.o_bias, residual=x)
            gate_up = linear(x, layer.gate_up_weight, norm=layer.post_norm, eps=eps)  # [M, 2I]
            x = linear(gate_up, layer.down_weight, gated=True, residual=x)
        x = _last_tokens(x.view(b, t, e), last_only, last_at)
        rows = x.reshape(-1, e)
        logits = linear(rows, self.lm_head, norm=self.final_norm, eps=eps, out_float32=True)
        return logits.view(b, -1, logits.shape[-1])  # [B, T', V] float32

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """invariant_kernels.linear with the weight's block shapes (self.linear_blocks)."""
        gemv, tiles = self.linear_blocks[weight.shape[0], weight.shape[1]]
        return self._kernels.linear(
            x, weight, *args, gemv=gemv, tiles=tiles, gemv_max_rows=self.gemv_max_rows, **kwargs
        )

    def _logits(self, x: torch.Tensor, last_only: bool, last_at: torch.Tensor | None) -> torch.Tensor:
        x = _last_tokens(x, last_only, last_at)
        return F.linear(rms_norm(x.float(), self.final_norm, self.eps), self.lm_head)  # [B, T', V] float32


def _last_tokens(x: torch.Tensor, last_only: bool, last_at: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, E] -> [B, T', E]: every token, or with last_only one per row (last_at[b], or T - 1)."""
    if not last_only:
        return x
    if last_at is None:
        return x[:, -1:]
    return x[torch.arange(x.shape[0], device=x.device), last_at][:, None]  # [B, 1, E]
