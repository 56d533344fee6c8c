"""The adaptive draft-length policy: the model, its choices, and losslessness with it on."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest

from service.engine import GenerationRequest, Method, SamplingParams
from service.engine.speculation import draft_length_policy
from service.engine.speculation.draft_length_policy import (
    MAX_SKIPPED_PLANS,
    PRIOR_RATE,
    AcceptanceEstimate,
    DraftLengthPolicy,
    PlanningBackoff,
    PooledAcceptance,
    RowPlanning,
)
from service.engine.speculation.drafters import Drafter
from service.engine.speculation.planning import DraftPlanner
from testkit.planned_batch import planned_batch
from tests.engine.helpers import run


def expected_tokens(rate: float, drafts: int) -> float:
    """E(a, d) of docs/engine.md (the draft-length policy), in closed form: tokens a pass
    emits with d drafts at per-draft acceptance a, the bonus token included."""
    if rate >= 1.0:
        return float(drafts + 1)
    return (1.0 - rate ** (drafts + 1)) / (1.0 - rate)


def best_cap_by_brute_force(
    policy: DraftLengthPolicy, rows: int, available: list[int], rates: list[float], floor: int
) -> int:
    """The policy's rule written out: the cap with the most expected tokens per second."""
    best, best_rate = None, -1.0
    for cap in range(floor, max(available) + 1):
        seconds = policy._estimate(policy._measured(32, False), cap)
        tokens = sum(expected_tokens(a, min(d, cap)) for d, a in zip(available, rates))
        if tokens / seconds > best_rate * (1 + 1e-12):
            best, best_rate = cap, tokens / seconds
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_chosen_cap_has_the_most_expected_tokens_per_second(seed: int) -> None:
    rng = random.Random(seed)
    policy = DraftLengthPolicy()
    _measured(
        policy,
        32,
        {
            n: (1.9 + rng.uniform(0.0, 0.2) * n + (0.5 if n else 0.0)) * 1e-3
            for n in rng.sample(range(9), rng.randint(1, 9))
        },
    )
    available = [rng.choice([0, 0, rng.randint(1, 8)]) for _ in range(32)]
    rates = [rng.random() if rng.random() < 0.9 else 1.0 for _ in range(32)]
    floor = rng.choice([0, 0, 0, 1, 2])
    if max(available) <= floor:
        available[0] = floor + 1
    assert policy.best_cap(32, available, rates, floor, False) == best_cap_by_brute_force(
        policy, 32, available, rates, floor
    )
    # The planner passes only the rows that propose, and counts the others as plain_rows:
    # the same choice and the same prediction.
    proposing = [(d, a) for d, a in zip(available, rates) if d]
    plain_rows = len(available) - len(proposing)
    only_proposing = policy._best(
        32, [d for d, _ in proposing], [a for _, a in proposing], floor, False, plain_rows
    )
    assert only_proposing == policy._best(32, available, rates, floor, False)


@pytest.mark.parametrize("seed", range(200))
def test_the_bound_of_alike_rows_never_says_plain_where_the_rows_could_pay(seed: int) -> None:
    """best_cap_alike (every row at the most drafts and the best rate of any) answers 0 only
    where best_cap over the rows themselves does; the planner then skips the row-by-row bound."""
    rng = random.Random(seed)
    policy = DraftLengthPolicy()
    _measured(
        policy, 32, {n: (1.9 + rng.uniform(0.0, 0.4) * n + (0.3 if n else 0.0)) * 1e-3 for n in range(9)}
    )
    count = rng.randint(1, 32)
    available = [rng.randint(1, 8) for _ in range(count)]
    rates = [rng.uniform(0.0, rng.choice([0.2, 0.5, 1.0])) for _ in range(count)]
    alike = policy.best_cap_alike(32, count, max(available), max(rates), False, 32 - count)
    exact = policy.best_cap(32, available, rates, 0, False, plain_rows=32 - count)
    assert alike >= 0 and (alike > 0 or exact == 0)
    # The rows made alike: the bound is best_cap itself.
    assert alike == policy.best_cap(32, [max(available)] * count, [max(rates)] * count, 0, False, 32 - count)


def test_the_bound_of_alike_rows_follows_best_cap_where_costs_are_borrowed_or_unknown() -> None:
    policy = DraftLengthPolicy()
    # Nothing measured at 32 rows: run as asked (the most drafts), never "plain" unseen.
    assert (
        policy.best_cap_alike(32, 4, 6, 0.05, False, 28)
        == 6
        == policy.best_cap(32, [6] * 4, [0.05] * 4, 0, False, 28)
    )
    # Only a plain pass measured at 32 rows: drafting costs borrowed from 16 rows, as best_cap does.
    _measured(policy, 16, {0: 7e-3, 1: 7.5e-3, 4: 9e-3})
    _measured(policy, 32, {0: 8e-3})
    for rate, expected in ((0.02, 0), (0.9, 4)):
        assert policy.best_cap_alike(32, 32, 4, rate, False) == expected
        assert policy.best_cap(32, [4] * 32, [rate] * 32, 0, False) == expected


class _FixedProposals(Drafter):
    """Proposes `proposals[slot]` drafts (capped by the limit) and counts its lookups."""

    method = Method.NGRAM
    drafts_on_host = True

    def __init__(self, proposals: dict[int, int]) -> None:
        self.proposals = proposals
        self.lookups = 0

    def plan(self, seq, limit: int) -> int:
        self.lookups += 1
        return min(limit, self.proposals.get(seq.slot, 0))

    def proposal_kinds(self):
        return ("kind",)

    def proposal_kind(self, seq):
        return "kind"


def _spy(monkeypatch, owner: type, name: str, record) -> None:
    """Replaces the method owner.name with one that first calls record with the same
    arguments (self included), then the method itself."""
    original = getattr(owner, name)

    def spied(*args, **kwargs):
        record(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spied)


def _planned_batch(ks: list[int], drafter: Drafter) -> SimpleNamespace:
    """A pass's batch as DraftPlanner.plan reads it: greedy rows that may adapt and do not back off."""
    rows = [
        SimpleNamespace(
            slot=i,
            k=k,
            max_tokens=100,
            completion_tokens=0,
            tokens=[1] * 10,
            num_drafts=0,
            method=Method.NGRAM,
        )
        for i, k in enumerate(ks)
    ]
    return planned_batch(rows, drafter, backs_off=False)


# A verify pass of 32 rows costs a third more than a plain one: one row's 4 likely drafts do not
# pay for it (32 + 1.3 tokens in 10.5 ms against 32 in 8), 32 rows' would.
_COSTS_32 = {0: 8e-3, 1: 9e-3, 2: 9.5e-3, 3: 10e-3, 4: 10.5e-3}


def test_the_planner_counts_the_rows_that_propose_nothing() -> None:
    """plan() hands the policy only the proposing rows: the others still count, one token each.
    Every row may draft (so the bound lets them look up), one proposes: its drafts do not pay
    for the verify pass of 32 rows (the rule over all 32 rows: cap 0)."""
    policy = DraftLengthPolicy()
    _measured(policy, 32, _COSTS_32)
    drafter = _FixedProposals({0: 4})
    batch = _planned_batch([4] * 32, drafter)
    DraftPlanner({Method.NGRAM: drafter}, max_context=1000, policy=policy).plan(batch)
    assert drafter.lookups == 32
    rate = policy.row(0).acceptance.rate_with(policy.pooled.rate("kind"))
    assert best_cap_by_brute_force(policy, 32, [4] + [0] * 31, [rate] + [0.0] * 31, 0) == 0
    assert [seq.num_drafts for seq in batch.rows] == [0] * 32


def test_the_bound_counts_the_rows_that_cannot_draft() -> None:
    """One row of 32 may draft (the others have k = 0): even at the best prior its drafts cannot
    pay for a verify pass of 32 rows, so no drafter looks anything up."""
    policy = DraftLengthPolicy()
    _measured(policy, 32, _COSTS_32)
    drafter = _FixedProposals({0: 4})
    batch = _planned_batch([4] + [0] * 31, drafter)
    DraftPlanner({Method.NGRAM: drafter}, max_context=1000, policy=policy).plan(batch)
    assert drafter.lookups == 0
    assert [seq.num_drafts for seq in batch.rows] == [0] * 32


def test_the_floor_leaves_the_gains_below_it_counted() -> None:
    # Rows that can propose one draft only still gain from every cap above the floor: 30 rows
    # with one likely draft, 2 rows with three. Cap 3 costs 3.5% more than cap 2, which its
    # extra expected tokens (+2.2% of all tokens) do not pay for; without the 30 rows' gains
    # they would (+4.4%).
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 1.9e-3, 2: 2.0e-3, 3: 2.07e-3})
    available, rates = [1] * 30 + [3] * 2, [0.99] * 30 + [0.9] * 2
    assert policy.best_cap(32, available, rates, floor=2, draft_model=False) == 2
    assert best_cap_by_brute_force(policy, 32, available, rates, floor=2) == 2


def test_expected_tokens_is_the_geometric_sum() -> None:
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_acceptance_estimate_is_the_bernoulli_mle_with_a_prior() -> None:
    estimate = AcceptanceEstimate()
    assert estimate.rate == pytest.approx(PRIOR_RATE)  # the prior
    for _ in range(50):
        estimate.update(proposed=4, accepted=4)  # never rejects
    assert estimate.rate > 0.95  # ~40 effective acceptances against the prior's weight of 2
    for _ in range(50):
        estimate.update(proposed=4, accepted=0)  # rejects at once
    assert estimate.rate < 0.15  # ~10 effective rejections against the prior's weight of 2
    before = estimate.rate
    estimate.update(proposed=0, accepted=0)  # nothing proposed: the evidence ages
    assert before < estimate.rate < PRIOR_RATE
    for _ in range(400):
        estimate.update(proposed=0, accepted=0)
    assert estimate.rate == pytest.approx(PRIOR_RATE, abs=0.01)  # back to the prior


def test_new_rows_try_drafting_and_stopped_rows_try_again() -> None:
    """The policy learns a row's acceptance only from passes that speculate: a new row must
    try (prior above break-even), one pass that rejects everything must stop it, and a row
    that stopped must try again after a while, not never."""
    policy = DraftLengthPolicy()
    # Batch 1, SmolLM2 on an H200 with the "layer" forward: plain 0.90 ms, verify 1.53 to
    # 1.58 ms (bench/RESULTS.md), every width measured.
    _measured(policy, 1, {0: 0.90e-3, **{n: (1.53 + 0.006 * n) * 1e-3 for n in range(1, 9)}})
    row = AcceptanceEstimate()
    assert policy.best_cap(1, [8], [row.rate], 0, False) > 0  # a new row tries
    row.update(proposed=8, accepted=0)
    assert policy.best_cap(1, [8], [row.rate], 0, False) == 0  # stops after a full rejection
    idle = 0
    while policy.best_cap(1, [8], [row.rate], 0, False) == 0 and idle < 1000:
        row.update(proposed=0, accepted=0)
        idle += 1
    assert 3 <= idle <= 20  # tries again, a few passes later
    row.update(proposed=8, accepted=0)  # rejected again
    idle = 0
    while policy.best_cap(1, [8], [row.rate], 0, False) == 0 and idle < 1000:
        row.update(proposed=0, accepted=0)
        idle += 1
    assert 20 <= idle <= 60  # repeated failures: rarer tries (each costs a verify pass)


def test_a_row_with_a_pooled_prior_stops_and_tries_again() -> None:
    """With its kind's pooled prior, which the same rejections lower, a row never accepted
    stops after its first rejection and tries again later, more rarely than with a fixed
    prior (layer-variant costs at batch 1: 11 then about 38 passes; here 49, then 64)."""
    policy = DraftLengthPolicy()
    _measured(policy, 1, {0: 0.90e-3, **{n: (1.53 + 0.006 * n) * 1e-3 for n in range(1, 9)}})
    row, gaps, idle = AcceptanceEstimate(), [], 0
    for _ in range(400):
        if policy.best_cap(1, [8], [row.rate_with(policy.pooled.rate("kind"))], 0, False):
            row.update(proposed=8, accepted=0)
            policy.pooled.record("kind", proposed=8, accepted=0)
            gaps.append(idle)
            idle = 0
        else:
            row.update(proposed=0, accepted=0)
            idle += 1
        policy.pooled.end_pass()
    assert gaps[0] == 0  # a new row tries at once
    assert all(30 <= gap <= 100 for gap in gaps[1:]) and len(gaps) >= 4  # stops, and comes back


def _measured(
    policy: DraftLengthPolicy, rows: int, costs: dict[int, float], draft_model: bool = False
) -> None:
    for drafts, seconds in costs.items():
        for _ in range(3):  # the first observation of a shape is discarded
            policy.observe(rows, drafts, draft_model, seconds)


def _keep_costs_as_told(policy: DraftLengthPolicy, monkeypatch) -> None:
    """The engine's own passes no longer update the policy's costs: what a pass of the tiny
    model costs depends on the processor and its thread count, and these tests are about the
    decisions taken from the costs they state, not about measuring them."""
    monkeypatch.setattr(policy, "observe", lambda *args, **kwargs: None)


def test_chooses_plain_decoding_when_verify_passes_cost_too_much() -> None:
    # Batch 32 on an H200 (bench/RESULTS.md): width 2 costs 65% more than width 1.
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 1.53e-3, 1: 2.52e-3, 2: 2.6e-3, 3: 2.7e-3, 4: 2.77e-3})
    cap = policy.choose(32, [4] * 32, [0.3] * 32, floor=0, draft_model=False)
    assert cap == 0


def test_keeps_long_drafts_when_acceptance_is_high_and_verify_is_cheap() -> None:
    # Batch 1: width 5 costs 1.68 ms against 1.27 ms for width 1.
    policy = DraftLengthPolicy()
    _measured(policy, 1, {0: 1.27e-3, 1: 1.54e-3, 2: 1.61e-3, 3: 1.65e-3, 4: 1.68e-3})
    assert policy.choose(1, [4], [0.9], floor=0, draft_model=False) == 4
    assert policy.choose(1, [4], [0.1], floor=0, draft_model=False) == 0


def test_explores_unmeasured_batches_and_respects_the_floor() -> None:
    policy = DraftLengthPolicy()
    assert policy.choose(8, [3, 0, 2], [0.1, 0.5, 0.1], floor=0, draft_model=False) == 3  # nothing measured
    _measured(policy, 8, {0: 1e-3, 3: 5e-3})
    assert policy.choose(8, [3, 0, 2], [0.1, 0.5, 0.1], floor=2, draft_model=False) >= 2


def test_a_bucket_without_drafting_costs_borrows_the_nearest_buckets_ratios() -> None:
    # A draft-model pass verifying 8 drafts at 32 rows costs several plain passes (the 8B
    # shape, bench/RESULTS.md). Bucket 64 has only its plain pass measured (a plain burst ran).
    policy = DraftLengthPolicy()
    _measured(policy, 32, {8: 50e-3}, draft_model=True)
    _measured(policy, 32, {0: 8.5e-3})
    _measured(policy, 64, {0: 10e-3})
    # Low acceptance: plain, without first drafting 8 tokens a row to measure bucket 64.
    assert policy.choose(64, [8] * 64, [0.05] * 64, floor=0, draft_model=True) == 0
    # The drafting costs are bucket 32's relative to its plain pass, on bucket 64's own plain pass.
    cost, borrowed = policy._cap_costs(64, True)
    assert cost(0) == pytest.approx(10e-3) and not borrowed(0)
    assert cost(8) == pytest.approx(10e-3 * 50 / 8.5) and borrowed(8)
    # Certain acceptance still drafts; the guess is not held against the model's calibration.
    assert policy.choose(64, [8] * 64, [1.0] * 64, floor=0, draft_model=True) == 8
    assert policy._promised is None
    # Once bucket 64's own drafting pass is measured, its costs are its own.
    _measured(policy, 64, {8: 80e-3}, draft_model=True)
    cost, borrowed = policy._cap_costs(64, True)
    assert cost(8) == pytest.approx(80e-3) and not borrowed(8)
    policy.choose(64, [8] * 64, [1.0] * 64, floor=0, draft_model=True)
    assert policy._promised is not None


def test_a_bucket_without_a_plain_cost_borrows_only_that() -> None:
    policy = DraftLengthPolicy()
    _measured(policy, 4, {0: 2e-3})
    _measured(policy, 4, {2: 3e-3, 8: 4e-3}, draft_model=True)
    _measured(policy, 16, {2: 6e-3, 8: 20e-3}, draft_model=True)  # 16 rows: no plain pass yet
    _measured(policy, 1, {0: 1e-3})  # farther from 16 than 4 is
    _measured(policy, 1, {2: 1.1e-3}, draft_model=True)
    cost, borrowed = policy._cap_costs(16, True)
    assert cost(0) == pytest.approx(4e-3) and borrowed(0)  # 6 ms / (3 / 2), from width 2
    # The widths bucket 16 measured are its own, not the donor's ratios (8: 20 ms, not 8).
    assert cost(2) == pytest.approx(6e-3) and not borrowed(2)
    assert cost(8) == pytest.approx(20e-3) and not borrowed(8)
    # Equally near buckets (8 is as far from 4 as from 16): the larger one lends.
    _measured(policy, 16, {0: 4.4e-3})
    cost, borrowed = policy._cap_costs(8, True)
    assert cost(2) == pytest.approx(6e-3) and borrowed(2)  # bucket 16's own costs: nothing at 8
    assert cost(0) == pytest.approx(4.4e-3) and borrowed(0)


def test_an_ngram_bucket_with_only_a_plain_pass_borrows_the_drafting_costs() -> None:
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 8e-3, 1: 16e-3, 2: 19e-3, 3: 22e-3, 4: 24e-3})
    _measured(policy, 64, {0: 10e-3})  # plain only: before, widths were 5% a draft above it
    cost, borrowed = policy._cap_costs(64, False)
    assert cost(0) == pytest.approx(10e-3) and not borrowed(0)
    assert cost(4) == pytest.approx(30e-3) and borrowed(4)
    # At 5% a draft, acceptance 0.5 would pay (1.5 tokens for 1.05 passes); at bucket 32's ratios not.
    assert policy.choose(64, [4] * 64, [0.5] * 64, floor=0, draft_model=False) == 0
    # Without a complete bucket anywhere, a bucket's own widths extrapolate (5% a draft).
    fresh = DraftLengthPolicy()
    _measured(fresh, 2, {3: 2e-3})
    cost, borrowed = fresh._cap_costs(2, False)
    assert cost(0) == pytest.approx(2e-3 * (1 - 3 * 0.05)) and not borrowed(0)


def test_outputs_stay_lossless_with_the_policy_on(make_engine, target, close_draft, tokenizer) -> None:
    engine = make_engine(
        target, draft=close_draft, max_batch_size=4, adaptive_draft_length=True, max_num_draft_tokens=5
    )
    ids = tuple(tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown"))
    plain = run(engine, [GenerationRequest("plain", ids, max_tokens=40, method=Method.NONE)])["plain"].tokens
    requests = [
        GenerationRequest(f"{m.name}{i}", ids, max_tokens=40, method=m, num_draft_tokens=5)
        for i in range(3)
        for m in (Method.NGRAM, Method.DRAFT_MODEL)
    ]
    for name, out in run(engine, requests).items():
        assert out.tokens == plain, name  # run() also checks every contract invariant
    seeded = [
        GenerationRequest(
            f"s{i}",
            ids,
            max_tokens=20,
            method=Method.DRAFT_MODEL,
            num_draft_tokens=3,
            sampling=SamplingParams(temperature=1.0, seed=7),
        )
        for i in range(2)
    ]
    outs = run(engine, seeded)
    assert outs["s0"].tokens == outs["s1"].tokens  # same seed, same output, policy or not


def test_a_stall_does_not_poison_a_measured_cost() -> None:
    policy = DraftLengthPolicy()
    _measured(policy, 1, {0: 1.27e-3, 4: 1.68e-3})
    policy.observe(1, 4, False, 0.25)  # e.g. a graph capture or a GC pause
    assert policy.choose(1, [4], [0.8], floor=0, draft_model=False) == 4


def test_planning_is_skipped_when_drafting_cannot_pay(make_engine, target, tokenizer, monkeypatch) -> None:
    from service.engine.speculation.drafters import NgramDrafter

    engine = make_engine(target, max_batch_size=2, adaptive_draft_length=True)
    # Verify passes cost 3x a plain pass at this batch size: no acceptance makes drafting pay.
    _measured(engine.draft_length_policy, 1, {n: (1e-3 if n == 0 else 3e-3) for n in range(9)})
    _keep_costs_as_told(engine.draft_length_policy, monkeypatch)
    plans = []
    _spy(monkeypatch, NgramDrafter, "plan", lambda self, seq, limit: plans.append(limit))
    ids = tuple(tokenizer.encode("the fox the fox the fox the fox the fox"))
    out = run(engine, [GenerationRequest("g", ids, max_tokens=12, method=Method.NGRAM, num_draft_tokens=4)])[
        "g"
    ]
    assert out.metrics.proposed_drafts == 0 and out.metrics.verify_passes == 11
    assert plans == [], "the n-gram lookups should have been skipped"


def test_pooled_acceptance_keeps_kinds_apart_and_forgets_what_is_no_longer_tried() -> None:
    pooled = PooledAcceptance()
    assert pooled.rate("short match") == PRIOR_RATE  # never seen: optimistic
    for _ in range(20):
        for _ in range(32):  # one pass of a batch of 32: every row's drafts, one update
            pooled.record("short match", proposed=4, accepted=0)
            pooled.record("long match", proposed=4, accepted=4)
        pooled.end_pass()
    assert pooled.rate("short match") < 0.05
    assert pooled.rate("long match") > 0.95
    passes = 0
    while pooled.rate("short match") < 0.45 and passes < 10_000:  # no longer tried: ages back
        pooled.end_pass()
        passes += 1
    assert 100 <= passes <= 400  # some hundreds of passes at batch 32: a fraction of a second
    assert pooled.rate("long match") > 0.45


def test_a_rows_prior_is_its_kinds_pooled_rate() -> None:
    """A new row whose proposal is of a kind that keeps failing does not try it; a new row
    whose kind pays does (batch 32, H200 costs of the diag_breakdown runs in
    bench/history/results/concurrency32/)."""
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 1.877e-3, 1: 1.948e-3, 2: 2.584e-3, 3: 2.643e-3, 4: 2.804e-3})
    for _ in range(10):
        for _ in range(8):
            policy.pooled.record("1-token match", proposed=4, accepted=0)
            policy.pooled.record("3-token match", proposed=4, accepted=3)
        policy.pooled.end_pass()
    new_row = AcceptanceEstimate()
    poor = new_row.rate_with(policy.pooled.rate("1-token match"))
    good = new_row.rate_with(policy.pooled.rate("3-token match"))
    assert policy.best_cap(32, [4] * 8 + [0] * 24, [poor] * 8 + [0.0] * 24, 0, False) == 0
    assert policy.best_cap(32, [4] * 8 + [0] * 24, [good] * 8 + [0.0] * 24, 0, False) > 0


def test_the_engine_pools_every_proposed_draft_by_match_length(
    make_engine, target, tokenizer, monkeypatch
) -> None:
    # Every pass plans: on the CPU a lookup is several percent of the tiny model's pass, and
    # the planning backoff (tested on its own below) would skip most of these short requests.
    monkeypatch.setattr(draft_length_policy, "MAX_SKIPPED_PLANS", 0)
    recorded = []
    _spy(
        monkeypatch,
        PooledAcceptance,
        "record",
        lambda self, kind, proposed, accepted: recorded.append((kind, proposed, accepted)),
    )
    engine = make_engine(target, max_batch_size=2, adaptive_draft_length=True)
    ids = tuple(tokenizer.encode("the fox the fox the fox the fox the fox"))
    outs = run(
        engine,
        [
            GenerationRequest(f"g{i}", ids, max_tokens=24, method=Method.NGRAM, num_draft_tokens=4)
            for i in range(2)
        ],
    )
    assert {kind for kind, _, _ in recorded} <= {(Method.NGRAM, n) for n in (1, 2, 3)}
    assert sum(p for _, p, _ in recorded) == sum(o.metrics.proposed_drafts for o in outs.values()) > 0
    assert sum(a for _, _, a in recorded) == sum(o.metrics.accepted_drafts for o in outs.values())
    assert set(engine.draft_length_policy.pooled.kinds) == {kind for kind, _, _ in recorded}


def _pass(policy: DraftLengthPolicy, realized: float) -> int:
    """One batch-32 pass: the policy chooses, the pass takes its measured cost and emits
    `realized` times the tokens the model expects (every row: 4 drafts at rate 0.6)."""
    cap = policy.choose(32, [4] * 32, [0.6] * 32, floor=0, draft_model=False)
    seconds = {0: 2.0e-3, 4: 2.4e-3}[cap]
    expected = 32 * (expected_tokens(0.6, 4) if cap else 1.0)
    policy.observe(32, cap, False, seconds, tokens=round(expected * realized if cap else expected))
    return cap


def test_a_model_that_promises_more_than_passes_deliver_is_corrected() -> None:
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 2.0e-3, 4: 2.4e-3})
    assert _pass(policy, realized=0.3) == 4  # the model expects 92% more tokens for 20% more time
    passes = 1
    while _pass(policy, realized=0.3) == 4 and passes < 100:
        passes += 1
    assert passes <= 6  # the speculating passes delivered a third of their promise: stopped
    idle = 0
    while _pass(policy, realized=0.3) == 0 and idle < 10_000:
        idle += 1
    assert 10 <= idle <= 400  # the correction ages out: speculation is tried again


def test_a_model_that_keeps_its_promise_keeps_speculating() -> None:
    policy = DraftLengthPolicy()
    _measured(policy, 32, {0: 2.0e-3, 4: 2.4e-3})
    assert all(_pass(policy, realized=1.0) == 4 for _ in range(200))
    assert policy.calibration[32].factor == pytest.approx(1.0, abs=0.01)


def _plans_in(
    backoff: PlanningBackoff, passes: int, per_row: float, plain_pass: float | None, drafts: bool = False
) -> list[int]:
    """Which of `passes` batch-32 passes one row looks up its proposal in, every row's
    lookup taking `per_row` seconds and the row drafting (or not) when it looks up."""
    row, planned = RowPlanning(), []
    for i in range(passes):
        backoff.start_pass(32, 32, plain_pass)
        if backoff.due(row):
            planned.append(i)
            backoff.measured(32, per_row, 1)
            backoff.planned(row, drafts)
    return planned


def test_a_row_backs_off_while_its_lookups_draft_nothing_and_resumes_when_one_drafts() -> None:
    backoff = PlanningBackoff()
    # Batch 32 on an H200: 32 lookups about 0.2 ms of a 2 ms plain pass (10%).
    planned = _plans_in(backoff, 60, per_row=6.25e-6, plain_pass=2e-3)
    gaps = [b - a - 1 for a, b in zip(planned, planned[1:])]
    assert gaps[:4] == [0, 2, 4, 8]  # doubling (from the second: the first lookup was not measured yet) ...
    assert set(gaps[4:]) == {9}  # ... up to one lookup in ten passes: ~1% of the time lost
    assert backoff.skipped == 60 - len(planned)
    backoff = PlanningBackoff()
    assert _plans_in(backoff, 20, per_row=6.25e-6, plain_pass=2e-3, drafts=True) == list(
        range(20)
    )  # drafts: every pass
    # Lookups as dear as passes: skips are bounded, a row that starts repeating waits at most that long.
    backoff = PlanningBackoff()
    planned = _plans_in(backoff, 200, per_row=2e-3 / 32, plain_pass=1e-4)
    assert max(b - a - 1 for a, b in zip(planned, planned[1:])) == MAX_SKIPPED_PLANS


def test_lookups_dearer_than_the_share_but_not_twice_it_are_halved() -> None:
    # 32 lookups at 1.5% of a plain pass: a declining row looks up every other pass (0.75%
    # lost); every pass would lose 1.5%, over PLANNING_SHARE.
    planned = _plans_in(PlanningBackoff(), 40, per_row=0.015 * 2e-3 / 32, plain_pass=2e-3)
    gaps = [b - a - 1 for a, b in zip(planned, planned[1:])]
    assert set(gaps[1:]) == {1}


def test_planning_never_backs_off_where_it_is_cheap_or_unmeasured() -> None:
    # Batch 1 on an H200: one lookup, a few microseconds of a 1 ms pass.
    backoff = PlanningBackoff()
    row = RowPlanning()
    for _ in range(50):
        backoff.start_pass(1, 1, 1e-3)
        assert backoff.due(row)
        backoff.measured(1, 5e-6, 1)
        backoff.planned(row, False)
    assert _plans_in(PlanningBackoff(), 50, per_row=1e-4, plain_pass=None) == list(
        range(50)
    )  # no plain pass measured


def test_a_skip_earned_in_a_large_batch_ends_where_lookups_are_cheap() -> None:
    backoff = PlanningBackoff()
    _plans_in(backoff, 20, per_row=6.25e-6, plain_pass=2e-3)  # batch 32: skips of up to 9 passes
    row = RowPlanning(declined=5, skipping=9)
    backoff.seconds[1] = 6.25e-6
    backoff.start_pass(1, 1, 1e-3)  # the batch shrank to one row: limit 0
    assert backoff.limit == 0 and backoff.due(row) and row.skipping == 0


def test_the_engine_skips_lookups_that_keep_finding_nothing_worth_drafting(
    make_engine, target, tokenizer, monkeypatch
) -> None:
    from service.engine.speculation.drafters import NgramDrafter

    engine = make_engine(target, max_batch_size=1, adaptive_draft_length=True)
    policy = engine.draft_length_policy
    # Plain passes are told to cost 1 ms, verify passes 2.5 ms; lookups are made as dear as a
    # plain pass and to propose from 1-token matches, whose pooled acceptance is near 0 (cap 0 every time),
    # while 2- and 3-token matches were always accepted (so drafting could pay: the lookups run).
    for n in range(9):
        for _ in range(3):
            policy.observe(1, n, False, 1e-3 if n == 0 else 2.5e-3)
    _keep_costs_as_told(policy, monkeypatch)
    plans = []

    def slow_plan(self, seq, limit):
        plans.append(len(seq.tokens))
        # As dear as a plain pass on whatever machine runs this (the backoff weighs lookups
        # against the measured pass cost, which the run keeps updating), and at least 1 ms.
        deadline = time.perf_counter() + max(1e-3, policy.plain_cost(1) or 0.0)
        while time.perf_counter() < deadline:
            pass
        row = self.rows[seq.slot]
        row.proposal = [1] * limit
        row.index.matched = 1
        return limit

    monkeypatch.setattr(NgramDrafter, "plan", slow_plan)
    for _ in range(50):
        policy.pooled.record((Method.NGRAM, 1), proposed=4, accepted=0)
        policy.pooled.record((Method.NGRAM, 2), proposed=4, accepted=4)
        policy.pooled.record((Method.NGRAM, 3), proposed=4, accepted=4)
        policy.pooled.end_pass()
    ids = tuple(tokenizer.encode("the fox the fox the fox"))
    out = run(engine, [GenerationRequest("g", ids, max_tokens=40, method=Method.NGRAM, num_draft_tokens=4)])[
        "g"
    ]
    assert out.metrics.proposed_drafts == 0 and out.metrics.verify_passes == 39
    # Lookups as dear as a pass, declined each time: planned passes 0, 2, 5, 10, 19, 35 (gaps of
    # 1, 2, 4, 8, then MAX_SKIPPED_PLANS), against all 39 without the backoff.
    assert 5 <= len(plans) <= 7, plans


def test_the_backoff_weighs_only_the_rows_that_look_up(make_engine, target, tokenizer, monkeypatch) -> None:
    """Rows that never draft (plain, k = 0) have no lookups for the backoff to skip: a pass's
    count of lookups, which sets how many passes a declining row may skip, leaves them out, and
    the policy keeps no acceptance history for them."""
    engine = make_engine(target, max_batch_size=4, adaptive_draft_length=True)
    counted = []
    _spy(
        monkeypatch,
        PlanningBackoff,
        "start_pass",
        lambda self, rows, lookups, plain_pass: counted.append((rows, lookups)),
    )
    histories = []
    _spy(
        monkeypatch, AcceptanceEstimate, "update", lambda self, proposed, accepted: histories.append(id(self))
    )
    ids = tuple(tokenizer.encode("the fox the fox the fox"))
    methods = [Method.NONE, Method.NONE, Method.NGRAM, Method.NGRAM]
    requests = [
        GenerationRequest(
            f"g{i}", ids, max_tokens=12, method=m, num_draft_tokens=0 if m is Method.NONE else 4
        )
        for i, m in enumerate(methods)
    ]
    run(engine, requests)
    assert any(rows == 4 for rows, _ in counted), counted  # the four rows decoded together
    assert counted and all(lookups <= 2 for _, lookups in counted), counted
    assert 0 < len(set(histories)) <= 2  # the n-gram rows' histories only
