"""The acceptance rule itself: greedy prefix, and the statistical losslessness of rejection
sampling, tested on many independent rows at once (vectorised), with a sampler that is
deliberately wrong to show that the test can fail."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from service.engine.speculation.sampling import sample_from
from service.engine.speculation.verify import greedy_accepted, verify_rejection
from tests.support.greedy_reference import verify_greedy

ALPHA = 1e-3
ROWS = 500_000
V = 6
N = 3  # draft positions


def _expected(probs: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    probs = probs.double()
    return probs / probs.sum() * total


def _chi2_pvalue(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=V).double()
    expected = _expected(expected_probs, counts.sum())
    assert (counts[expected == 0] == 0).all(), "a token with zero target probability was emitted"
    keep = expected > 0
    return float(stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue)


def _distributions(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed target p [N + 1, V] and draft q [N, V] distributions (prefix-independent)."""
    p = torch.softmax(torch.randn(N + 1, V, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(N, V, generator=gen) * 1.5, dim=-1)
    p[1, 4] = 0.0  # a token the target never emits at position 1
    p[1] /= p[1].sum()
    return p, q


def buggy_verify(p, q, drafts, num_drafts, u_accept, u_bonus):
    """A classic mistake: on rejection, resample from p instead of norm(max(0, p - q))."""
    b, n = drafts.shape
    p_x = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    valid = torch.arange(n)[None, :] < num_drafts[:, None]
    accepted = ((u_accept * q_x < p_x) & valid).long().cumprod(1).sum(1)
    bonus = sample_from(p[torch.arange(b), accepted], u_bonus)
    tokens = torch.cat([drafts, drafts.new_zeros(b, 1)], 1)
    tokens.scatter_(1, accepted[:, None], bonus[:, None])
    return accepted, tokens


def _run(verify, one_hot_draft: bool, seed: int = 1234):
    gen = torch.Generator().manual_seed(seed)
    p, q = _distributions(gen)
    if one_hot_draft:
        # n-gram: the drafts are fixed before verification (here: guesses that favour likely
        # tokens, drawn independently of the verifier's uniforms); q is one-hot on them.
        guess = p[:N] ** 2
        drafts = torch.stack(
            [torch.multinomial(guess[i], ROWS, replacement=True, generator=gen) for i in range(N)], 1
        )
        q_rows = torch.nn.functional.one_hot(drafts, V).float()  # [R, N, V]
    else:
        drafts = torch.stack(
            [torch.multinomial(q[i], ROWS, replacement=True, generator=gen) for i in range(N)], 1
        )
        q_rows = q[None].expand(ROWS, N, V).clone()
    num_drafts = torch.randint(0, N + 1, (ROWS,), generator=gen)  # d_s varies per row, 0 included
    q_rows *= (torch.arange(N)[None, :] < num_drafts[:, None])[..., None]  # zero past d_s (contract)
    p_rows = p[None].expand(ROWS, N + 1, V)
    u_accept = torch.rand(ROWS, N, generator=gen)
    u_bonus = torch.rand(ROWS, generator=gen)
    accepted, tokens = verify(p_rows, q_rows, drafts, num_drafts, u_accept, u_bonus)
    return p, q, drafts, num_drafts, accepted, tokens


def _position_pvalues(p, accepted, tokens) -> list[float]:
    """The token emitted at position j (present iff accepted >= j) must follow p_j."""
    return [_chi2_pvalue(tokens[accepted >= j, j], p[j]) for j in range(N + 1)]


@pytest.mark.parametrize("one_hot_draft", [False, True], ids=["draft-model", "ngram"])
def test_rejection_sampling_emits_target_distribution(one_hot_draft: bool) -> None:
    p, q, drafts, num_drafts, accepted, tokens = _run(verify_rejection, one_hot_draft)
    assert (accepted <= num_drafts).all()
    # accepted drafts are the drafts themselves
    for j in range(N):
        rows = accepted > j
        assert torch.equal(tokens[rows, j], drafts[rows, j])
    pvalues = _position_pvalues(p, accepted, tokens)
    assert min(pvalues) > ALPHA, pvalues
    # Enough rows reach the deepest position for the test to mean something there too.
    assert int((accepted >= N).sum()) > 2_000


def test_acceptance_probability_matches_theory() -> None:
    # P(accept draft 0 | d_s >= 1) = sum_x min(p0(x), q0(x)).
    p, q, drafts, num_drafts, accepted, tokens = _run(verify_rejection, one_hot_draft=False)
    rows = num_drafts >= 1
    observed = float((accepted[rows] >= 1).double().mean())
    expected = float(torch.minimum(p[0], q[0]).sum())
    n = int(rows.sum())
    assert abs(observed - expected) < 4 * (expected * (1 - expected) / n) ** 0.5


def test_chi_square_catches_a_wrong_sampler() -> None:
    # Same harness, residual bug: the test must reject it.
    p, *_, accepted, tokens = _run(buggy_verify, one_hot_draft=False)
    assert min(_position_pvalues(p, accepted, tokens)) < ALPHA


@pytest.mark.parametrize("one_hot_draft", [False, True], ids=["draft-model", "ngram"])
def test_chi_square_has_power_for_a_5_percent_distortion(one_hot_draft: bool) -> None:
    # Compare the correct sampler's output against a target moved by 5% of its mass
    # (0.95 p + 0.05 uniform): the sample size must be enough to tell them apart.
    p, *_, accepted, tokens = _run(verify_rejection, one_hot_draft)
    for j in range(N + 1):
        distorted = 0.95 * p[j] + 0.05 / V
        samples = tokens[accepted >= j, j]
        counts = torch.bincount(samples, minlength=V).double()
        pvalue = stats.chisquare(counts.numpy(), _expected(distorted, counts.sum()).numpy()).pvalue
        assert pvalue < ALPHA, (j, pvalue)


def test_greedy_accepts_the_longest_matching_prefix() -> None:
    logits = torch.full((3, 4, 10), -5.0)
    argmax = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    logits.scatter_(-1, argmax[..., None], 5.0)
    drafts = torch.tensor([[1, 2, 9], [1, 2, 3], [5, 6, 7]])
    num = torch.tensor([3, 3, 1])
    accepted, tokens = verify_greedy(logits, drafts, num)
    assert accepted.tolist() == [2, 3, 1]
    assert tokens[0, :3].tolist() == [1, 2, 3]  # two drafts, then the correction 3
    assert tokens[1].tolist() == [1, 2, 3, 4]  # all accepted, then the bonus 4
    assert tokens[2, :2].tolist() == [5, 6]  # d_s = 1: the bonus comes after one draft


def test_host_greedy_rule_equals_the_device_one() -> None:
    """The decode pass's greedy path (greedy_accepted, on the host) and verify_greedy agree."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 6, 10, generator=gen)
    best = logits.argmax(-1)  # [200, 6]
    drafts = torch.where(
        torch.rand(200, 5, generator=gen) < 0.8, best[:, :5], torch.randint(0, 10, (200, 5), generator=gen)
    )
    num = torch.randint(0, 6, (200,), generator=gen)
    accepted, _ = verify_greedy(logits, drafts, num)
    host = [greedy_accepted(drafts[r, : num[r]].tolist(), best[r].tolist()) for r in range(200)]
    assert host == accepted.tolist()
    assert len(set(host)) == 6  # every prefix length 0..5 occurs: the comparison has teeth


def test_rejection_rule_with_one_hot_target_is_greedy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, 10, generator=gen)
    drafts = torch.where(
        torch.rand(64, 3, generator=gen) < 0.7,
        logits[:, :3].argmax(-1),
        torch.randint(0, 10, (64, 3), generator=gen),
    )
    num = torch.randint(0, 4, (64,), generator=gen)
    p = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    q = torch.nn.functional.one_hot(drafts, 10).float() * (torch.arange(3)[None] < num[:, None])[..., None]
    a1, t1 = verify_greedy(logits, drafts, num)
    a2, t2 = verify_rejection(
        p, q, drafts, num, torch.rand(64, 3, generator=gen), torch.rand(64, generator=gen)
    )
    assert torch.equal(a1, a2)
    for r in range(64):
        assert t1[r, : a1[r] + 1].tolist() == t2[r, : a2[r] + 1].tolist()
