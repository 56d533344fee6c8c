"""Draft planning: how many drafts (d_s) each row proposes in the coming decode pass, from
what its drafter could propose, the context left, and the draft-length policy."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.engine.api import Method
from service.engine.sequence import Sequence
from service.engine.speculation.draft_length_policy import DraftLengthPolicy
from service.engine.speculation.drafters import Drafter

if TYPE_CHECKING:
    from service.engine.batch_layout import DecodeBatch


class DraftPlanner:
    def __init__(
        self, drafters: dict[Method, Drafter], max_context: int, policy: DraftLengthPolicy | None = None
    ) -> None:
        self.drafters = drafters
        self.max_context = max_context
        self.policy = policy

    @staticmethod
    def adapts(seq: Sequence) -> bool:
        """Whether the policy may shorten this row's drafts. Seeded sampled rows keep theirs:
        their random stream, and so their output, must not depend on timings."""
        return seq.sampling.greedy or seq.request.sampling.seed is None

    @staticmethod
    def drafts_with_model(rows: list[Sequence]) -> bool:
        """Whether the draft model runs this pass (it runs only for rows that draft)."""
        return any(seq.method is Method.DRAFT_MODEL and seq.num_drafts > 0 for seq in rows)

    def plan(self, batch: DecodeBatch) -> None:
        """Sets every row's d_s for the coming pass."""
        rows = batch.rows
        policy = self.policy
        if not batch.can_draft:
            self._plan_plain(batch)
            return
        limits = []  # per row: at most this many drafts, 0 where the row does not plan
        for seq in rows:
            remaining = seq.max_tokens - seq.completion_tokens  # a pass emits up to d_s + 1 tokens
            room = self.max_context - len(seq.tokens)
            limits.append(max(0, min(seq.k, remaining - 1, room - 1)))
        backoff = policy.planning if policy is not None else None
        if backoff is not None:
            backoff.start_pass(
                batch.hi,
                sum(1 for limit, b in zip(limits, batch.backs_off) if limit and b),
                policy.plain_cost(batch.hi),
            )
            for i, (seq, backs_off) in enumerate(zip(rows, batch.backs_off)):
                if limits[i] and backs_off and not backoff.due(policy.row(seq.slot).planning):
                    limits[i] = 0  # its lookups keep drafting nothing: not this pass
        # Rows whose drafts are fixed (seeded sampling) always plan; the others only when
        # drafting could pay at all.
        if not any(limits) or (
            policy is not None and all(batch.adapts) and self._drafting_cannot_pay(batch, limits)
        ):
            self._plan_plain(batch)
            return
        looked_up: list[Sequence] = []  # rows whose lookup the backoff may skip, planning now
        started = time.perf_counter()
        for seq, drafter, limit, backs_off in zip(rows, batch.drafters, limits, batch.backs_off):
            seq.num_drafts = drafter.plan(seq, limit) if limit else 0  # no drafts allowed: no plan
            if limit and backs_off:
                looked_up.append(seq)
        if policy is None:
            return
        backoff.measured(batch.hi, time.perf_counter() - started, len(looked_up))
        if any(seq.num_drafts for seq in rows):
            rates = [
                policy.row(seq.slot).acceptance.rate_with(policy.pooled.rate(drafter.proposal_kind(seq)))
                if seq.num_drafts
                else 0.0
                for seq, drafter in zip(rows, batch.drafters)
            ]
            self._shorten_drafts(batch, rates)
        else:
            policy.choose(batch.hi, [], [], 0, False)  # nothing proposed (the usual pass on open chat)
        for seq in looked_up:
            backoff.planned(policy.row(seq.slot).planning, seq.num_drafts > 0)

    def _plan_plain(self, batch: DecodeBatch) -> None:
        """No row drafts in the coming pass (counted as the policy's choice of cap 0)."""
        for seq in batch.rows:
            seq.num_drafts = 0
        if self.policy is not None:
            self.policy.choose(batch.hi, [], [], 0, False)

    def _shorten_drafts(self, batch: DecodeBatch, rates: list[float]) -> None:
        """Caps d_s by the policy."""
        rows = batch.rows
        fixed = [seq.num_drafts for seq, adapts in zip(rows, batch.adapts) if not adapts]
        cap = self.policy.choose(
            batch.hi,
            [seq.num_drafts for seq in rows],
            rates,
            max(fixed, default=0),
            self.drafts_with_model(rows),
        )
        for seq, adapts in zip(rows, batch.adapts):
            if adapts:
                seq.num_drafts = min(seq.num_drafts, cap)

    def _drafting_cannot_pay(self, batch: DecodeBatch, limits: list[int]) -> bool:
        """True when plain decoding beats drafting even if every row proposed its whole limit
        at the best rate its drafter's proposals could have: then no drafter need plan.
        Only for batches whose drafts the policy may shorten (no fixed rows)."""
        rows, policy = batch.rows, self.policy
        # An upper bound on what planning could show: each row's own evidence with the best
        # prior any of its drafter's kinds of proposal has.
        best_prior = {
            drafter: max(map(policy.pooled.rate, drafter.proposal_kinds()), default=0.0)
            for drafter in self.drafters.values()
        }
        bounds = [
            policy.row(seq.slot).acceptance.rate_with(best_prior[drafter]) if limit else 0.0
            for seq, drafter, limit in zip(rows, batch.drafters, limits)
        ]
        draft_model = any(seq.method is Method.DRAFT_MODEL and limit for seq, limit in zip(rows, limits))
        return policy.best_cap(batch.hi, limits, bounds, 0, draft_model) == 0

    def record(self, seq: Sequence, drafter: Drafter, accepted: int) -> None:
        """The pooled acceptance of the row's kind of proposal learns the pass's verdict
        (`accepted` of its d_s drafts), for a row that goes on."""
        if self.policy is not None and seq.num_drafts:
            self.policy.pooled.record(drafter.proposal_kind(seq), seq.num_drafts, accepted)

    def absorb(self, seq: Sequence, accepted: int) -> None:
        """The row's own acceptance history learns the pass's verdict."""
        if self.policy is not None:
            self.policy.row(seq.slot).acceptance.update(seq.num_drafts, accepted)

    def release(self, seq: Sequence) -> None:
        """The row left its slot: the policy forgets it."""
        if self.policy is not None:
            self.policy.forget(seq.slot)
