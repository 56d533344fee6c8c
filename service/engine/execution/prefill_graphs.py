"""One-row prefill passes replayed from captured CUDA graphs (docs/prefill.md, "Captured
one-row prefill").

An eager dense prefill (dense_prefill.py) launches about fifteen kernels a layer from
Python; for a short prompt the launches, not the GPU, set its time, and a request that
arrives alone waits for all of them before its first token. Here the prefill of one row
from position 0 (its whole prompt, or the first chunk of a longer one) of up to
`max_tokens` tokens is one graph per token bucket: the tokens are padded to the bucket, the
row's length and slot enter through static device buffers, and the padding tokens are kept
out of the attention and written behind the row's positions (dense_prefill.pack_one_row).
Longer ones, later chunks and passes of several rows run eagerly, as before.

The graphs run the same kernels as the eager pass, at the bucket's token count, so a
prompt's cache and first token round as an eager prefill of that many tokens would
(prefill results are not row-invariant: docs/prefill.md).
"""

from __future__ import annotations

import torch

from service.engine.execution import dense_prefill as dense
from service.engine.execution.device import to_device
from service.engine.execution.kv_cache import StaticKVCache
from service.engine.execution.model_forward import ModelForward

# Padded prompt lengths: 16-token steps up to 64, 32 up to 256, 64 up to 512. Padding
# costs compute, not weight reads (at worst 65 -> 96 and 257 -> 320 tokens).
TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class GraphedPrefill:
    """The captured one-row prefill graphs of one model runner, over its KV cache."""

    def __init__(self, lean: ModelForward, cache: StaticKVCache, max_tokens: int, scratch_pos: int) -> None:
        """max_tokens: the most tokens a graph serves (rounded down to a bucket, at most the
        cache's usable length `scratch_pos`, the position the padding writes)."""
        if not lean.dense_prefill:
            raise ValueError("captured prefill graphs need the dense prefill")
        self.lean = lean
        self.cache = cache
        self.scratch_pos = scratch_pos
        self.buckets = tuple(b for b in TOKEN_BUCKETS if b <= min(max_tokens, scratch_pos))
        device = cache.device
        widest = self.buckets[-1] if self.buckets else 0
        self.ids = torch.zeros(widest, dtype=torch.long, device=device)  # [W] the prompt, padded
        self.row = torch.zeros(2, dtype=torch.long, device=device)  # [slot, length]
        self.out = torch.empty((1, 1, lean.lm_head.shape[0]), dtype=torch.float32, device=device)  # [1, 1, V]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.captures = 0  # graphs captured so far

    def fits(self, rows: int, starts: list[int], lengths: list[int]) -> bool:
        """True for a pass of one row from position 0 (a prompt or its first chunk) that a
        bucket holds."""
        return bool(self.buckets) and rows == 1 and starts[0] == 0 and lengths[0] <= self.buckets[-1]

    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def capture_all(self) -> int:
        """Captures every bucket not captured yet (before any request: they write slot 0)."""
        missing = [b for b in self.buckets if b not in self.graphs]
        for width in missing:
            self.row.copy_(torch.tensor([0, width]))
            self.graphs[width] = self._capture(width)
        return len(missing)

    def _pass(self, width: int) -> torch.Tensor:
        """The captured computation: the row's tokens ids[:length] of `width` (the rest pads)."""
        slot, length = self.row[:1], self.row[1:]
        packed, write_pos = dense.pack_one_row(slot, length, width, self.scratch_pos)
        keys, values = self.cache.rows(0, self.cache.max_batch)
        positions = packed.token_index  # [W] rotary positions 0 .. W - 1
        return self.lean.prefill_packed(
            self.ids[:width], positions, packed, packed.key_rows, write_pos, keys, values
        )  # [1, 1, V]

    def _capture(self, width: int) -> torch.cuda.CUDAGraph:
        """Captures the bucket's graph with the static buffers as they are: the warm-up runs
        compute that row's prefill, which the replay then writes again."""
        self.captures += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._pass(width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out.copy_(self._pass(width))
        return graph

    def __call__(self, slot: int, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """The prefill of slot `slot`'s prompt input_ids [1, >= length] (its first `length`
        tokens, from position 0): float32 logits [1, 1, V] of its last token (a tensor of its
        own: the next replay does not overwrite it)."""
        width = self.bucket(length)
        self.ids[:length].copy_(input_ids[0, :length])
        self.row.copy_(to_device([slot, length], torch.long, self.row.device))
        graph = self.graphs.get(width)
        if graph is None:
            graph = self.graphs[width] = self._capture(width)
        graph.replay()
        return self.out.clone()
