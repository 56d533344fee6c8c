"""Verification of draft tokens against the target model: greedy and rejection sampling.

Greedy passes compare on the host (greedy_accepted, on the target's argmaxes once they are
there); sampled passes run verify_rejection on the device, which returns per row the number
of accepted drafts `a` and a token row whose first a + 1 entries are what the pass emits (the
accepted drafts, then the target's bonus/correction token). tests/support/greedy_reference.py
holds the greedy rule on the device, which tests/engine/test_verify.py compares with both.
"""

from __future__ import annotations

import torch

from service.engine.speculation.sampling import sample_from


def _accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """ok: [B, n] bool -> [B] long, the length of the all-True prefix of each row."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def greedy_accepted(drafts: list[int], target: list[int]) -> int:
    """The greedy rule for one row, on the host: the length of the longest prefix of
    `drafts` (this row's d_s drafts) equal to the target's argmaxes `target` (len >= d_s)."""
    accepted = 0
    for draft, best in zip(drafts, target):
        if draft != best:
            break
        accepted += 1
    return accepted


def verify_rejection(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    u_accept: torch.Tensor,
    u_bonus: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023); lossless.

    p: [B, n + 1, V] the target's processed distributions at the pending token and after each
       draft. q: [B, n, V] the drafter's processed distributions that the drafts were drawn
       from; one-hot for deterministic drafters (n-gram) and greedy rows; must be ZERO at
       positions >= num_drafts. drafts: [B, n] long. num_drafts: [B] long (d_s).
    u_accept: [B, n], u_bonus: [B] uniforms in [0, 1) from each request's own generator.
    Returns accepted [B] long and tokens [B, n + 1] long (first accepted + 1 are emitted).

    With one-hot p (greedy rows) this is exactly the greedy rule: a draft is accepted iff it
    is the argmax, and the correction/bonus token is the argmax.
    """
    b, n = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    p_x = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1)  # [B, n]  p_i(x_i)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)  # [B, n]  q_i(x_i)
    valid = torch.arange(n, device=drafts.device)[None, :] < num_drafts[:, None]  # [B, n]

    # THE ACCEPTANCE RULE. Draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)),
    # i.e. iff u_i < p_i(x_i) / q_i(x_i), written without the division as u_i * q_i(x_i) < p_i(x_i).
    # Drafts are accepted left to right; the first rejection ends the pass.
    accepted = _accepted_prefix((u_accept * q_x < p_x) & valid)  # [B]

    # The extra token, sampled from norm(max(0, p_a - q_a)) at the first rejected position a.
    # If every draft was accepted (a = d_s), q_a is zero by contract, so this is p_a itself:
    # the bonus token drawn from the target's distribution after the last draft.
    q_padded = torch.cat([q, q.new_zeros(b, 1, q.shape[-1])], dim=1)  # [B, n + 1, V]
    p_a = p[rows, accepted]  # [B, V]
    residual = (p_a - q_padded[rows, accepted]).clamp_min_(0.0)  # [B, V]
    # p == q exactly makes rejection impossible in exact arithmetic; guard the float edge case.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    bonus = sample_from(residual, u_bonus)  # [B]

    tokens = torch.cat([drafts, drafts.new_zeros(b, 1)], dim=1)  # [B, n + 1]
    tokens.scatter_(1, accepted[:, None], bonus[:, None])
    return accepted, tokens
