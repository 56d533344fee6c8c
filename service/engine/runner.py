"""Runs one model's forward over batch slots, against that model's static KV cache."""

from __future__ import annotations

import torch

from service.engine.device import to_device
from service.engine.kv_cache import StaticKVCache, causal_mask
from service.model_loading import LoadedModel


class ModelRunner:
    """A model plus its KV cache. Slots are rows of the cache; the caller tracks lengths."""

    def __init__(self, loaded: LoadedModel, max_batch: int, max_len: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        self.max_len = max_len
        self.max_position = loaded.max_context_tokens
        self.cache = StaticKVCache(max_batch, max_len, self.device, loaded.dtype)
        self.vocab_size = loaded.vocab_size

    @torch.inference_mode()
    def forward(self, lo: int, hi: int, input_ids: torch.Tensor, starts: list[int], last_only: bool = False) -> torch.Tensor:
        """Runs slots [lo, hi) on input_ids [hi - lo, T]; row r's tokens go to positions
        starts[r] .. starts[r] + T - 1 and see the row's cache below starts[r].

        Returns float32 logits [hi - lo, T, V] ([hi - lo, 1, V] with last_only).
        Positions past a row's real tokens (padding) write cache entries that the row's
        length excludes; later writes overwrite them.
        """
        width = input_ids.shape[1]
        starts_t = to_device(starts, torch.long, self.device)  # [B]
        positions = starts_t[:, None] + torch.arange(width, device=self.device)  # [B, T]
        kv_len = min(max(starts) + width, self.max_len)
        window = self.cache.window(lo, hi, positions.clamp(max=self.max_len - 1), kv_len)
        mask = causal_mask(starts_t, width, kv_len, self.loaded.dtype)  # [B, 1, T, kv_len]
        out = self.model(
            input_ids=input_ids,
            position_ids=positions.clamp(max=self.max_position - 1),
            attention_mask=mask,
            past_key_values=window,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return out.logits.float()
