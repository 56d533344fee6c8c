"""A lean forward pass for the Llama / Qwen2 family, over the engine's static KV cache.

transformers' own forward is correct but issues many small kernels and Python-level
dispatch per layer (17 ms per pass eager for SmolLM2-135M on an H200). This module runs the
same math as explicit tensor code with fused projections: one QKV matmul and one gate/up
matmul per layer. Weights and config still come from the transformers model; the fused
matrices are built once and the model's own Linear weights become views into them, so no
weight is stored twice and the transformers forward keeps working (tests compare the two).

Shapes: B rows, T new tokens per row, K cached positions read, H query heads, G kv heads,
D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def supports(model: torch.nn.Module) -> bool:
    """True when `model` is a family this forward reproduces exactly."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False  # Qwen2 sliding-window layers need their own mask
    if getattr(config, "mlp_bias", False) or getattr(config, "hidden_act", "silu") != "silu":
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


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` along the output dimension and make
    each Linear's parameters views into the fused tensors (no second copy of any weight)."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    bias = None
    if any(has_bias):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None
                          else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
                          for lin in linears])
    row = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = torch.nn.Parameter(weight[row:row + rows], requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(bias[row:row + rows], requires_grad=False)
        row += rows
    return weight, bias


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


def pre_attention(x: torch.Tensor, norm: torch.Tensor, qkv_weight: torch.Tensor,
                  qkv_bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, h: int, g: int, d: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, E] -> rotated q [B, H, T, D], rotated k [B, G, T, D], v [B, G, T, D]."""
    b, t, _ = x.shape
    qkv = F.linear(rms_norm(x, norm, eps), qkv_weight, qkv_bias)  # [B, T, (H + 2G) * D]
    q, k, v = qkv.view(b, t, h + 2 * g, d).transpose(1, 2).split((h, g, g), dim=1)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def post_attention(x: torch.Tensor, attn: torch.Tensor, o_weight: torch.Tensor,
                   o_bias: torch.Tensor | None, norm: torch.Tensor, gate_up_weight: torch.Tensor,
                   down_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Residual stream x [B, T, E] after attention output attn [B, H, T, D] and the MLP."""
    b, _, t, _ = attn.shape
    x = x + F.linear(attn.transpose(1, 2).reshape(b, t, -1), o_weight, o_bias)
    gate, up = F.linear(rms_norm(x, norm, eps), gate_up_weight).chunk(2, dim=-1)  # [B, T, I] each
    return x + F.linear(F.silu(gate) * up, down_weight)


class LeanForward:
    """The decoder stack of a Llama/Qwen2 model as explicit tensor code.

    compile=True fuses the per-layer work around attention with torch.compile (CUDA);
    the cache write and the attention itself stay eager, so compile never sees the cache.
    The final norm and the LM head run in float32: bfloat16 logits are so coarse (about
    0.1 apart near 20) that ties between the top two tokens are common, and which one wins
    then depends on tiny shape-dependent rounding upstream.
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        if not supports(model):
            raise ValueError(f"lean forward does not support model_type {model.config.model_type!r}")
        config = model.config
        decoder = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = decoder.embed_tokens.weight  # [V, E]
        self.final_norm = decoder.norm.weight.float()  # [E]
        head = model.lm_head.weight  # [V, E] (tied to embed when the model ties them)
        self.lm_head = head if head.dtype == torch.float32 else head.float()
        self.pre_attention = torch.compile(pre_attention, dynamic=True) if compile else pre_attention
        self.post_attention = torch.compile(post_attention, dynamic=True) if compile else post_attention
        self.rotary = decoder.rotary_emb
        self.layers: list[_Layer] = []
        for block in decoder.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_weight, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_weight, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(_Layer(
                input_norm=block.input_layernorm.weight,
                qkv_weight=qkv_weight, qkv_bias=qkv_bias,
                o_weight=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                post_norm=block.post_attention_layernorm.weight,
                gate_up_weight=gate_up_weight, down_weight=mlp.down_proj.weight,
            ))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T] long
        positions: torch.Tensor,  # [B, T] long, rotary positions
        write_pos: torch.Tensor,  # [B, T] long, cache slot of each new token
        mask: torch.Tensor,  # [B, 1, T, K] additive, in the model dtype
        keys: list[torch.Tensor],  # per layer [B, G, L, D] (views of the cache rows)
        values: list[torch.Tensor],  # per layer [B, G, L, D]
        last_only: bool = False,
    ) -> torch.Tensor:
        b, t = input_ids.shape
        kv_len = mask.shape[-1]
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(input_ids, self.embed)  # [B, T, E]
        cos, sin = self.rotary(x, positions)  # [B, T, D] each
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, T, D]
        index = write_pos[:, None, :, None].expand(b, g, t, d)  # [B, G, T, D]
        for layer, k_cache, v_cache in zip(self.layers, keys, values):
            q, k, v = self.pre_attention(x, layer.input_norm, layer.qkv_weight, layer.qkv_bias,
                                         cos, sin, self.eps, h, g, d)
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            attn = F.scaled_dot_product_attention(
                q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask,
                scale=self.scale, enable_gqa=h != g)  # [B, H, T, D]
            x = self.post_attention(x, attn, layer.o_weight, layer.o_bias, layer.post_norm,
                                    layer.gate_up_weight, layer.down_weight, self.eps)
        if last_only:
            x = x[:, -1:]
        return F.linear(rms_norm(x.float(), self.final_norm, self.eps), self.lm_head)  # [B, T', V] float32
