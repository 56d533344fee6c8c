"""Logits processing (temperature, top-k, top-p) and sampling from explicit uniforms.

Every row of a batch has its own parameters. Randomness never comes from a global RNG: the
caller draws uniforms from each request's own torch.Generator and passes them in, so a
request's output depends on its seed alone, not on which other requests share the batch.
Greedy rows get a one-hot distribution on the argmax, which turns every sampling rule below
into its greedy counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.execution.device import to_device
from service.engine.speculation.row_sampling import RowSampling

GREEDY = RowSampling()


@dataclass
class BatchSampling:
    """Per-row parameters as device tensors, for `probs_from_logits`."""

    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32 (1.0 on greedy rows, unused there)
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] long, 0 = off
    any_filter: bool  # host-side: does any sampling row use top-k or top-p?
    all_greedy: bool

    @staticmethod
    def build(rows: list[RowSampling], device: torch.device) -> BatchSampling:
        greedy = [r.greedy for r in rows]
        return BatchSampling(
            greedy=to_device(greedy, torch.bool, device),
            temperature=to_device(
                [1.0 if g else r.temperature for r, g in zip(rows, greedy)], torch.float32, device
            ),
            top_p=to_device([r.top_p for r in rows], torch.float32, device),
            top_k=to_device([r.top_k for r in rows], torch.long, device),
            any_filter=any((r.top_k > 0 or r.top_p < 1.0) and not r.greedy for r in rows),
            all_greedy=all(greedy),
        )

    def slice(self, lo: int, hi: int) -> BatchSampling:
        """Rows [lo, hi); the host-side flags stay conservative (those of the whole batch)."""
        return BatchSampling(
            greedy=self.greedy[lo:hi],
            temperature=self.temperature[lo:hi],
            top_p=self.top_p[lo:hi],
            top_k=self.top_k[lo:hi],
            any_filter=self.any_filter,
            all_greedy=self.all_greedy,
        )


def probs_from_logits(logits: torch.Tensor, params: BatchSampling) -> torch.Tensor:
    """The processed distribution of every row and position.

    logits: [B, T, V] (any float dtype). Returns [B, T, V] float32 probabilities: one-hot on
    the argmax for greedy rows; softmax(logits / temperature) restricted to the top_k most
    likely tokens and then to the smallest prefix (by probability) whose mass reaches top_p,
    renormalised, for the others.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)  # [B, T, V]
    if params.all_greedy:
        return one_hot
    scaled = logits / params.temperature[:, None, None]  # [B, T, V]
    if params.any_filter:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, T, V] each
        ranks = torch.arange(vocab, device=logits.device)  # [V]
        top_k = torch.where(params.top_k > 0, params.top_k, vocab)  # [B]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None, None], float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [B, T, V]
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [B, T, V]
        # Keep a token while the mass of the more likely ones is still below top_p (the first
        # token is always kept).
        sorted_probs = sorted_probs * (mass_before < params.top_p[:, None, None])
        sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
        probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    else:
        probs = torch.softmax(scaled, dim=-1)
    return torch.where(params.greedy[:, None, None], one_hot, probs)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V] (need not be normalised), uniforms [...] in [0, 1).

    Returns [...] long. A token with zero mass is never chosen; a one-hot distribution
    always yields its token, whatever the uniform.
    """
    cdf = probs.cumsum(-1)  # [..., V]
    target = (uniforms * cdf[..., -1]).unsqueeze(-1)  # [..., 1]
    index = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)
