"""The greedy verification rule on the device: the reference the engine's host comparison
(service.engine.speculation.verify.greedy_accepted) and its rejection sampler with one-hot
distributions are tested against (tests/engine/test_verify.py)."""

from __future__ import annotations

import torch


def verify_greedy(
    logits: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: accept the longest prefix of drafts equal to the target's argmaxes.

    logits: [B, n + 1, V] target logits at the pending token and after each draft.
    drafts: [B, n] long; num_drafts: [B] long, d_s (entries at or beyond d_s are padding).
    Returns accepted [B] long and tokens [B, n + 1] long.
    """
    n = drafts.shape[1]
    target = logits.argmax(dim=-1)  # [B, n + 1]
    valid = torch.arange(n, device=drafts.device)[None, :] < num_drafts[:, None]  # [B, n]
    accepted = (
        ((drafts == target[:, :n]) & valid).long().cumprod(dim=1).sum(dim=1)
    )  # [B]: the all-True prefix
    # The accepted drafts equal the argmaxes, and the bonus is the argmax after them.
    return accepted, target
