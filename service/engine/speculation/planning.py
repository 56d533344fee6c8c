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
        """Sets every row's d_s for the coming pass.

        Its time is on the pass's critical path (the device waits for it), so after one loop
        over the rows everything goes over the rows that may draft only: at 32 rows or more
        most of them skip their lookups (the backoff) or have nothing to propose."""
        rows = batch.rows
        policy = self.policy
        if not batch.can_draft:
            self._plan_plain(batch)
            return
        max_context = self.max_context
        # (row, its drafter, at most this many drafts, whether the backoff may skip its
        # lookup, whether the policy may shorten its drafts): the rows that may draft
        candidates: list[tuple[Sequence, Drafter, int, bool, bool]] = []
        for seq, drafter, backs_off, adapts in zip(rows, batch.drafters, batch.backs_off, batch.adapts):
            seq.num_drafts = 0
            # a pass emits up to d_s + 1 tokens, within the row's max_tokens and the context
            limit = min(seq.k, seq.max_tokens - seq.completion_tokens - 1, max_context - len(seq.tokens) - 1)
            if limit > 0:
                candidates.append((seq, drafter, limit, backs_off, adapts))
        if policy is not None:
            backoff = policy.planning
            backoff.start_pass(batch.hi, sum(c[3] for c in candidates), policy.plain_cost(batch.hi))
            # a row whose lookups keep drafting nothing skips some passes'
            candidates = [c for c in candidates if not c[3] or backoff.due(policy.row(c[0].slot).planning)]
        # Rows whose drafts are fixed (seeded sampling) always plan; the others only when
        # drafting could pay at all.
        if not candidates or (
            policy is not None and all(batch.adapts) and self._drafting_cannot_pay(batch, candidates)
        ):
            if policy is not None:
                policy.choose(batch.hi, [], [], 0, False)  # a plain pass (cap 0)
            return
        looked_up: list[Sequence] = []  # rows whose lookup the backoff may skip, planning now
        started = time.perf_counter()  # the lookups' time: the backoff's measure
        proposing: list[tuple[Sequence, Drafter, bool]] = []  # (row, drafter, adapts): d_s > 0
        for seq, drafter, limit, backs_off, adapts in candidates:
            seq.num_drafts = drafts = drafter.plan(seq, limit)
            if backs_off:
                looked_up.append(seq)
            if drafts:
                proposing.append((seq, drafter, adapts))
        if policy is None:
            return
        backoff.measured(batch.hi, time.perf_counter() - started, len(looked_up))
        if proposing:
            self._shorten_drafts(batch, proposing)
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

    def _shorten_drafts(self, batch: DecodeBatch, proposing: list[tuple[Sequence, Drafter, bool]]) -> None:
        """Caps d_s of the proposing rows by the policy; the pass's other rows emit one token each."""
        policy = self.policy
        rates = [
            policy.row(seq.slot).acceptance.rate_with(policy.pooled.rate(drafter.proposal_kind(seq)))
            for seq, drafter, _ in proposing
        ]
        cap = policy.choose(
            batch.hi,
            [seq.num_drafts for seq, _, _ in proposing],
            rates,
            max((seq.num_drafts for seq, _, adapts in proposing if not adapts), default=0),
            any(seq.method is Method.DRAFT_MODEL for seq, _, _ in proposing),
            plain_rows=len(batch.rows) - len(proposing),
        )
        for seq, _, adapts in proposing:
            if adapts:
                seq.num_drafts = min(seq.num_drafts, cap)

    def _drafting_cannot_pay(
        self, batch: DecodeBatch, candidates: list[tuple[Sequence, Drafter, int, bool, bool]]
    ) -> bool:
        """True when plain decoding beats drafting even if every candidate row proposed its
        whole limit at the best rate its drafter's proposals could have: then no drafter
        need plan. Only for batches whose drafts the policy may shorten (no fixed rows)."""
        policy = self.policy
        # An upper bound on what planning could show: each row's own evidence with the best
        # prior any of its drafter's kinds of proposal has.
        best_prior = {
            drafter: max(map(policy.pooled.rate, drafter.proposal_kinds()), default=0.0)
            for drafter in self.drafters.values()
        }
        bounds = [
            policy.row(seq.slot).acceptance.rate_with(best_prior[drafter]) for seq, drafter, *_ in candidates
        ]
        draft_model = any(seq.method is Method.DRAFT_MODEL for seq, *_ in candidates)
        limits = [limit for _, _, limit, _, _ in candidates]
        return (
            policy.best_cap(
                batch.hi, limits, bounds, 0, draft_model, plain_rows=len(batch.rows) - len(candidates)
            )
            == 0
        )

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
