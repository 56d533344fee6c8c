"""Prefill forwards at the GPU's matrix throughput: cuBLAS linears and FlashAttention over
the real prompt tokens of a pass, packed.

A prefill pass feeds hundreds to thousands of token rows. The row-invariant kernels of
service/engine/execution/invariant_kernels.py are written for decode and verify passes (up to a few
hundred rows); at prefill sizes their 16-row tiles and one-query-tile-per-key-chunk
attention run far below the GPU's matrix rate (docs/prefill.md has the measurement). Here a
prefill pass of a half-precision model runs as:

- the rows' real tokens only, packed into one [N, E] matrix (padding tokens of the
  rectangular [B, T] batch are never computed nor written to the cache);
- every linear through F.linear (cuBLAS); the norms, the rotary embedding with the cache
  write, and the SiLU product as one Triton kernel each (service/engine/execution/prefill_kernels.py),
  rounding where transformers' bfloat16 Llama rounds;
- attention through FlashAttention's variable-length kernel: row b's queries are its n_b new
  tokens, its keys the first starts[b] + n_b cache positions (its cached prefix and the keys
  this pass wrote), gathered packed; the kernel's causal mask is aligned to the end of
  each row's keys, so new token t sees positions 0 .. starts[b] + t, as causal_mask says.

Prefill results are not row-invariant (cuBLAS picks its algorithm from the shape): a
prompt's cache and first token can round differently when prefilled with other prompts or
in other chunks. The engine's bfloat16 guarantee is about decode and verify passes
(speculative == plain, docs/prefill.md): both read the same cache, whichever way it was
written. Float32 models keep the invariant kernels for prefill too.

Shapes: B rows, T the batch's width, N real tokens (sum of the rows' lengths), Kt keys
gathered (sum of starts[b] + n_b), E hidden, H query heads, G kv heads, D head dim,
L cache length.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from service.engine.execution.device import to_device


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True where FlashAttention runs: a CUDA GPU of compute capability 8.0 or more, half
    precision, a head dim it supports."""
    if (
        device.type != "cuda"
        or dtype not in (torch.bfloat16, torch.float16)
        or head_dim > 256
        or head_dim % 8
    ):
        return False
    return (
        torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


@dataclass
class PackedRows:
    """Where a pass's real tokens and the keys each row attends to are (device tensors)."""

    token_index: torch.Tensor  # [N] long: flat index b * T + t of each real token, rows in order
    key_rows: torch.Tensor  # [Kt] long: cache row of each gathered key
    key_pos: torch.Tensor  # [Kt] long: its position
    cu_tokens: torch.Tensor  # [B + 1] int32: row b's tokens are packed rows cu[b] .. cu[b + 1] - 1
    cu_keys: torch.Tensor  # [B + 1] int32: same for its keys
    max_tokens: int
    max_keys: int
    last: torch.Tensor  # [B] long: packed index of each row's last real token


def pack(
    starts: list[int], lengths: list[int], width: int, cache_len: int, device: torch.device
) -> PackedRows:
    """The packing of rows with `lengths[b]` real tokens (1 .. width) written from position
    starts[b]. Built from host lists with no device synchronisation. Key positions are
    clamped to the cache: only a row whose tokens are not used (a slot of the span that
    is not being prefilled, which the caller pads) can reach past it."""
    b = len(starts)
    if any(not 1 <= n <= width for n in lengths):
        raise ValueError(f"every row needs 1 to {width} tokens, not {lengths}")
    keys = [s + n for s, n in zip(starts, lengths)]
    total_tokens, total_keys = sum(lengths), sum(keys)
    cu_tokens = [0, *accumulate(lengths)]
    cu_keys = [0, *accumulate(keys)]
    meta = to_device([lengths, keys, cu_tokens[:-1], cu_keys[:-1]], torch.long, device)  # [4, B]
    n, k, token0, key0 = meta
    cu = to_device([cu_tokens, cu_keys], torch.int32, device)  # [2, B + 1]
    rows = torch.arange(b, device=device)
    token_index = torch.repeat_interleave(rows * width - token0, n, output_size=total_tokens) + torch.arange(
        total_tokens, device=device
    )
    key_rows = torch.repeat_interleave(rows, k, output_size=total_keys)
    key_pos = (
        torch.arange(total_keys, device=device) - torch.repeat_interleave(key0, k, output_size=total_keys)
    ).clamp_(max=cache_len - 1)
    return PackedRows(
        token_index, key_rows, key_pos, cu[0], cu[1], max(lengths), max(keys), (cu[0, 1:] - 1).long()
    )


def pack_one_row(
    slot: torch.Tensor, length: torch.Tensor, width: int, scratch_pos: int
) -> tuple[PackedRows, torch.Tensor]:
    """The packing of one row's first `length` tokens, from position 0, padded to `width`
    tokens, from device scalars alone (slot, length: [1] long), so that a captured graph
    serves every length up to `width` (prefill_graphs.py). Keys and the cache writes index
    the whole cache (rows are cache slots): token t < length is written at (slot, t); the
    padding tokens at (slot, scratch_pos), behind every position a row uses, and they are
    outside cu_tokens, so the attention neither computes them nor lets a real token see
    them (their attention rows are left unwritten, whatever the buffer held, which reaches
    only the padding's own rows and the scratch position). Returns the packing and the write
    positions [width]."""
    index = torch.arange(width, device=slot.device)  # [W]
    rows = slot.expand(width).contiguous()  # [W]: the cache-write kernel reads it as a dense array
    cu = torch.cat([torch.zeros_like(length), length]).int()  # [2]: the row is tokens 0 .. length - 1
    write_pos = torch.where(index < length, index, scratch_pos)  # [W]
    packed = PackedRows(
        token_index=index,
        key_rows=rows,
        key_pos=index,  # keys past `length` are gathered but outside cu_keys: never read
        cu_tokens=cu,
        cu_keys=cu,
        max_tokens=width,
        max_keys=width,
        last=length - 1,  # [1]
    )
    return packed, write_pos


def attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, packed: PackedRows, scale: float
) -> torch.Tensor:
    """q [N, H, D] (rotated) over each row's keys in k_cache, v_cache [B, G, L, D]
    (this pass's keys already written): [N, H, D]. Grouped-query heads as the kernel
    supports them (query head j reads kv head j // (H / G), as transformers' repeat_kv)."""
    keys = k_cache[packed.key_rows, :, packed.key_pos]  # [Kt, G, D]
    values = v_cache[packed.key_rows, :, packed.key_pos]
    if not q.is_cuda:
        return reference_attention(q, keys, values, packed, scale)
    # The variable-length FlashAttention kernel (torch's own, as its lower-right CausalBias
    # calls it): with is_causal its mask is aligned to the end of each row's keys
    # (bottom-right) where a row has more keys than queries.
    return torch.ops.aten._flash_attention_forward(
        q,
        keys,
        values,
        packed.cu_tokens,
        packed.cu_keys,
        packed.max_tokens,
        packed.max_keys,
        0.0,
        True,
        False,
        scale=scale,
    )[0]


def reference_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, packed: PackedRows, scale: float
) -> torch.Tensor:
    """What the FlashAttention call computes, row by row in plain torch (off CUDA: tests on
    Triton's interpreter): q [N, H, D], keys and values packed [Kt, G, D]. Row b's query i
    of n sees its keys 0 .. i + (k - n) of k."""
    out = torch.empty_like(q)
    repeat = q.shape[1] // keys.shape[1]
    cu_tokens, cu_keys = packed.cu_tokens.tolist(), packed.cu_keys.tolist()
    for b in range(len(cu_tokens) - 1):
        q_b = q[cu_tokens[b] : cu_tokens[b + 1]].transpose(0, 1)  # [H, n, D]
        k_b = keys[cu_keys[b] : cu_keys[b + 1]].transpose(0, 1).repeat_interleave(repeat, 0)  # [H, k, D]
        v_b = values[cu_keys[b] : cu_keys[b + 1]].transpose(0, 1).repeat_interleave(repeat, 0)
        n, k = q_b.shape[1], k_b.shape[1]
        visible = torch.arange(k)[None, :] <= torch.arange(n)[:, None] + (k - n)  # [n, k]
        scores = (q_b.float() @ k_b.float().transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        out[cu_tokens[b] : cu_tokens[b + 1]] = (scores.softmax(-1) @ v_b.float()).transpose(0, 1).to(q.dtype)
    return out


def layer(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    packed: PackedRows,
    write_rows: torch.Tensor,
    write_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    weights,
    eps: float,
    h: int,
    g: int,
    d: int,
    scale: float,
) -> torch.Tensor:
    """One decoder layer over packed tokens x [N, E]; writes their keys and values at
    (write_rows, write_pos) [N] of k_cache, v_cache [B, G, L, D]. cos, sin: [N, D]."""
    from service.engine.execution import prefill_kernels as kernels  # Triton: CUDA machines only

    n = x.shape[0]
    qkv = F.linear(kernels.rms_norm(x, weights.input_norm, eps), weights.qkv_weight, weights.qkv_bias)
    kernels.rotary_and_write(qkv, cos, sin, write_rows, write_pos, k_cache, v_cache, h, g, d)
    q = qkv.view(n, h + 2 * g, d)[:, :h].contiguous()  # [N, H, D], rotated in place
    attn = attention(q, k_cache, v_cache, packed, scale)  # [N, H, D]
    x = x + F.linear(attn.reshape(n, h * d), weights.o_weight, weights.o_bias)
    gate_up = F.linear(kernels.rms_norm(x, weights.post_norm, eps), weights.gate_up_weight)  # [N, 2I]
    return x + F.linear(kernels.silu_mul(gate_up), weights.down_weight)
