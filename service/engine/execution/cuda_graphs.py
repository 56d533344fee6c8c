"""Decode and verify passes replayed from captured CUDA graphs.

A pass over rows [0, B) with T new tokens per row and K cached positions read is one
graph per shape bucket (B rounded up to a power of two, T exact, K rounded up to a power of
two), captured on first use and replayed afterwards: the whole decoder stack becomes one
launch, so the pass costs what its kernels cost, not what launching them costs.

Inputs enter through static buffers (token ids, row starts); the mask, positions and cache
write positions are computed inside the graph from the starts. Every graph writes its logits
into one shared output buffer, so memory does not grow with the number of graphs (graphs
replay one at a time on one stream; a pass's logits are consumed before the next replay).
`capture_all` captures every bucket up front, so that no request pays for a capture in the
middle of its decoding. Rows that only pad a bucket, and the warm-up runs before a capture,
start at the cache's scratch region (behind the usable positions), so they never overwrite
keys a real row will read.
"""

from __future__ import annotations

import torch

from service.engine.execution.device import to_device
from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.model_forward import ModelForward

MIN_KV_BUCKET = 64


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class GraphedDecoder:
    def __init__(
        self,
        lean: ModelForward,
        cache: StaticKVCache,
        max_batch: int,
        max_width: int,
        max_len: int,
        scratch_start: int,
    ) -> None:
        self.lean = lean
        self.cache = cache
        self.max_batch = max_batch
        self.max_width = max_width
        self.max_len = max_len
        self.scratch_start = scratch_start
        device = cache.device
        self.ids = torch.zeros((max_batch, max_width), dtype=torch.long, device=device)  # [Bmax, Tmax]
        self.starts = torch.full((max_batch,), scratch_start, dtype=torch.long, device=device)  # [Bmax]
        vocab = lean.lm_head.shape[0]
        self.out = torch.empty(
            (max_batch, max_width, vocab), dtype=torch.float32, device=device
        )  # [Bmax, Tmax, V]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.captures = 0  # graphs captured so far (a pass that captured is not steady-state)

    def fits(self, hi: int, width: int) -> bool:
        return hi <= self.max_batch and width <= self.max_width

    def buckets(self, hi: int, width: int, max_start: int) -> tuple[int, int, int]:
        batch = min(_pow2_at_least(hi), self.max_batch)
        kv = min(max(_pow2_at_least(max_start + width), MIN_KV_BUCKET), self.max_len)
        return batch, width, kv

    def all_buckets(self) -> list[tuple[int, int, int]]:
        """Every (batch, width, kv) bucket a pass can map to."""
        batches = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
        kvs, kv = [], MIN_KV_BUCKET
        while True:
            kvs.append(min(kv, self.max_len))
            if kv >= self.max_len:
                break
            kv *= 2
        return [(b, w, k) for b in batches for k in kvs for w in range(1, self.max_width + 1)]

    def capture_all(self) -> int:
        """Captures every bucket not captured yet; returns how many it captured."""
        missing = [key for key in self.all_buckets() if key not in self.graphs]
        for key in missing:
            self.graphs[key] = self._capture(key)
        return len(missing)

    def _pass(self, batch: int, width: int, kv: int) -> torch.Tensor:
        """The captured computation: rows [0, batch), width new tokens, kv positions read."""
        starts = self.starts[:batch]  # [B]
        positions = starts[:, None] + torch.arange(width, device=starts.device)  # [B, T]
        write_pos = positions.clamp(max=self.cache.max_len - 1)
        mask = causal_mask(starts, width, kv, self.cache.dtype)  # [B, 1, T, kv]
        keys, values = self.cache.rows(0, batch)
        return self.lean(self.ids[:batch, :width], positions, write_pos, mask, keys, values)

    def _capture(self, key: tuple[int, int, int]) -> torch.cuda.CUDAGraph:
        batch, width, kv = key
        self.captures += 1
        saved = self.starts.clone()
        self.starts.fill_(self.scratch_start)  # warm-up writes land in the scratch region
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._pass(batch, width, kv)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.out[:batch, :width].copy_(self._pass(batch, width, kv))  # [B, T, V] float32
        self.starts.copy_(saved)
        return graph

    def __call__(self, lo: int, hi: int, input_ids: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """Like ModelRunner.forward for rows [lo, hi): float32 logits [hi - lo, T, V]."""
        width = input_ids.shape[1]
        key = self.buckets(hi, width, max(starts))
        batch = key[0]
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph = self.graphs[key]
        # Rows outside [lo, hi) pad the bucket: they start in the scratch region.
        row_starts = [self.scratch_start] * lo + list(starts) + [self.scratch_start] * (batch - hi)
        self.starts[:batch].copy_(to_device(row_starts, torch.long, self.starts.device))
        self.ids[lo:hi, :width].copy_(input_ids)
        graph.replay()
        return self.out[lo:hi, :width]
