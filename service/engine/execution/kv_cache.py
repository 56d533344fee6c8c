"""Static, preallocated KV cache with per-row lengths, usable by transformers models.

One buffer pair per layer, shaped [max_batch, kv_heads, max_len, head_dim], allocated on the
first write (so the shapes come from the model itself) and never reallocated. A batch row is
a slot of these buffers. Nothing here knows a row's length: the caller passes, for every
forward, the position of each row's first new token (`starts`), and the attention mask built
from those starts hides everything at or beyond a row's own length. Rolling a row back is
therefore a length reset in the caller's bookkeeping; stale entries are simply overwritten
by later writes.

transformers' decoder layers call `past_key_values.update(key, value, layer_idx)` and use
what it returns as the full keys/values; together with a prepared 4D attention mask (which
`create_causal_mask` returns unchanged) this is all the model needs from a cache object.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """The buffers of one model: [max_batch, kv_heads, max_len, head_dim] per layer."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_batch = max_batch
        self.max_len = max_len
        self.device = device
        self.dtype = dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            _, heads, _, head_dim = like.shape
            shape = (self.max_batch, heads, self.max_len, head_dim)
            self.keys[layer_idx] = torch.zeros(shape, device=self.device, dtype=like.dtype)
            self.values[layer_idx] = torch.zeros(shape, device=self.device, dtype=like.dtype)
        return self.keys[layer_idx], self.values[layer_idx]

    def allocate(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """Allocate every layer's buffers now (the lean forward and captured graphs need
        them to exist before the first pass)."""
        like = torch.empty((1, kv_heads, 1, head_dim), device=self.device, dtype=self.dtype)
        for layer_idx in range(num_layers):
            self._buffers(layer_idx, like)

    def rows(self, lo: int, hi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer views of slots [lo, hi): ([B, kv_heads, max_len, head_dim], ...)."""
        n = len(self.keys)
        return ([self.keys[i][lo:hi] for i in range(n)], [self.values[i][lo:hi] for i in range(n)])

    def window(self, lo: int, hi: int, write_pos: torch.Tensor, kv_len: int) -> CacheWindow:
        """A cache view for one forward over slots [lo, hi).

        write_pos: [hi - lo, T] long, the cache position of every new token of every row.
        kv_len: how many leading positions the attention reads (>= every row's end).
        """
        return CacheWindow(self, lo, hi, write_pos, kv_len)


class CacheWindow:
    """What a transformers model sees as `past_key_values` during one forward."""

    is_compileable = False

    def __init__(self, cache: StaticKVCache, lo: int, hi: int, write_pos: torch.Tensor, kv_len: int) -> None:
        self._cache = cache
        self._lo, self._hi = lo, hi
        self._write_pos = write_pos  # [B, T]
        self._kv_len = kv_len

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, kv_heads, T, head_dim]
        keys, values = self._cache._buffers(layer_idx, key_states)
        k = keys[self._lo : self._hi]  # [B, kv_heads, max_len, head_dim], a view
        v = values[self._lo : self._hi]
        b, heads, t, head_dim = key_states.shape
        index = self._write_pos[:, None, :, None].expand(b, heads, t, head_dim)  # [B, H, T, D]
        k.scatter_(2, index, key_states.to(k.dtype))
        v.scatter_(2, index, value_states.to(v.dtype))
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]

    # Only consulted by mask creation / position inference, which we bypass; kept for safety.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return len(self._cache.keys)


def causal_mask(starts: torch.Tensor, width: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, width, kv_len]: query t of row b sees keys 0..starts[b]+t.

    starts: [B] long, the position of each row's first new token (= the row's cached length).
    """
    query_pos = starts[:, None] + torch.arange(width, device=starts.device)  # [B, T]
    key_pos = torch.arange(kv_len, device=starts.device)  # [K]
    allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=starts.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # [B, 1, T, K]
