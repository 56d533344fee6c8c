"""Draft planning: how many drafts (d_s) each row proposes in the coming decode pass, from
what its drafter could propose, the context left, and the draft-length policy."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

from service.engine.api import Method
from service.engine.sequence import Sequence
from service.engine.speculation.draft_length_policy import DraftLengthPolicy, RowPolicy
from service.engine.speculation.drafters import Drafter

if TYPE_CHECKING:
    from service.engine.batch_layout import DecodeBatch


class _Candidate(NamedTuple):
    """A row that may draft in the coming pass."""

    seq: Sequence
    drafter: Drafter
    limit: int  # the most drafts it may propose (> 0)
    row: RowPolicy  # the policy's state of the row
    backs_off: bool  # the backoff may skip its lookup
    adapts: bool  # the policy may shorten its drafts


class _Proposing(NamedTuple):
    """A row whose lookup proposed drafts (d_s > 0) for the coming pass."""

    seq: Sequence
    drafter: Drafter
    row: RowPolicy
    adapts: bool


class DraftPlanner:
    def __init__(
        self, drafters: dict[Method, Drafter], max_context: int, policy: DraftLengthPolicy | None = None
    ) -> None:
        self.drafters = drafters
        self.max_context = max_context
        self.policy = policy
        # (a batch, the policy's state of each of its rows): looked up once per batch
        self._row_policies_of: tuple[DecodeBatch, list[RowPolicy]] | None = None

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

        Its time is on the pass's critical path (the device waits for it): one loop over the
        rows finds those that may draft and what each could at best show, then everything
        goes over those rows only. At 32 rows or more most of them skip their lookups (the
        backoff) or have nothing to propose, and where drafting cannot pay a cheap bound
        says so before the exact one (docs/engine.md, "Planning")."""
        rows = batch.rows
        policy = self.policy
        if not batch.can_draft:
            self._plan_plain(batch)
            return
        draft_limit = self._draft_limit
        if policy is None:  # fixed draft lengths: every row proposes what it can
            for seq, drafter in zip(rows, batch.drafters):
                limit = draft_limit(seq)
                seq.num_drafts = drafter.plan(seq, limit) if limit > 0 else 0
            return
        backoff = policy.planning
        backoff.start_pass(batch.hi, batch.backoff_rows, policy.plain_cost(batch.hi))
        best_prior = self._best_priors()
        candidates: list[_Candidate] = []
        bounds: list[float] = []  # [candidates]: the best acceptance its drafts could have
        for seq, drafter, row, backs_off, adapts in zip(
            rows, batch.drafters, self._row_policies(batch), batch.backs_off, batch.adapts
        ):
            seq.num_drafts = 0
            if backs_off and not backoff.due(row.planning):
                continue  # first: most rows skip their lookup at 32 rows or more
            limit = draft_limit(seq)
            if limit > 0:
                candidates.append(_Candidate(seq, drafter, limit, row, backs_off, adapts))
                bounds.append(row.acceptance.rate_with(best_prior[drafter]))
        # Rows whose drafts are fixed (seeded sampling) always plan; the others only when
        # drafting could pay at all.
        if not candidates or (all(batch.adapts) and self._drafting_cannot_pay(batch, candidates, bounds)):
            policy.choose(batch.hi, [], [], 0, False)  # a plain pass (cap 0)
            return
        # The backoff learns, once the policy has capped the drafts, whether each of these
        # rows drafts in the pass: a proposal the policy cuts to 0 counts as drafting nothing.
        looked_up: list[tuple[Sequence, RowPolicy]] = []
        started = time.perf_counter()  # the lookups' time: the backoff's measure
        proposing: list[_Proposing] = []
        for seq, drafter, limit, row, backs_off, adapts in candidates:
            seq.num_drafts = drafts = drafter.plan(seq, limit)
            if backs_off:
                looked_up.append((seq, row))
            if drafts:
                proposing.append(_Proposing(seq, drafter, row, adapts))
        backoff.measured(batch.hi, time.perf_counter() - started, len(looked_up))
        if proposing:
            self._shorten_drafts(batch, proposing)
        else:
            policy.choose(batch.hi, [], [], 0, False)  # nothing proposed (the usual pass on open chat)
        for seq, row in looked_up:
            backoff.planned(row.planning, seq.num_drafts > 0)

    def _draft_limit(self, seq: Sequence) -> int:
        """The most drafts the row may propose: a pass emits up to d_s + 1 tokens, within
        the row's k, its max_tokens and the context."""
        return min(seq.k, seq.max_tokens - seq.completion_tokens - 1, self.max_context - len(seq.tokens) - 1)

    def _plan_plain(self, batch: DecodeBatch) -> None:
        """No row drafts in the coming pass (counted as the policy's choice of cap 0)."""
        for seq in batch.rows:
            seq.num_drafts = 0
        if self.policy is not None:
            self.policy.choose(batch.hi, [], [], 0, False)

    def _shorten_drafts(self, batch: DecodeBatch, proposing: list[_Proposing]) -> None:
        """Caps d_s of the proposing rows by the policy; the pass's other rows emit one token each."""
        policy = self.policy
        rates = [
            p.row.acceptance.rate_with(policy.pooled.rate(p.drafter.proposal_kind(p.seq))) for p in proposing
        ]
        cap = policy.choose(
            batch.hi,
            [p.seq.num_drafts for p in proposing],
            rates,
            max((p.seq.num_drafts for p in proposing if not p.adapts), default=0),
            any(p.seq.method is Method.DRAFT_MODEL for p in proposing),
            plain_rows=len(batch.rows) - len(proposing),
        )
        for p in proposing:
            if p.adapts:
                p.seq.num_drafts = min(p.seq.num_drafts, cap)

    def _drafting_cannot_pay(
        self,
        batch: DecodeBatch,
        candidates: list[_Candidate],
        bounds: list[float],
    ) -> bool:
        """True when plain decoding beats drafting even if every candidate row proposed its
        whole limit at the best rate its drafter's proposals could have (`bounds`): then no
        drafter need plan. Only for batches whose drafts the policy may shorten (no fixed
        rows). First with every candidate at the most drafts and the best bound of any (a
        bound of the bound, whose cost does not grow with the rows): where even that cannot
        pay, neither can the rows; only otherwise row by row."""
        policy = self.policy
        limits = [c.limit for c in candidates]
        draft_model = any(c.seq.method is Method.DRAFT_MODEL for c in candidates)
        plain_rows = len(batch.rows) - len(candidates)
        alike = policy.best_cap_alike(
            batch.hi, len(candidates), max(limits), max(bounds), draft_model, plain_rows
        )
        if alike == 0:
            return True
        return policy.best_cap(batch.hi, limits, bounds, 0, draft_model, plain_rows=plain_rows) == 0

    def _best_priors(self) -> dict[Drafter, float]:
        """Per drafter, the best pooled acceptance any of its kinds of proposal has: with a
        row's own evidence, an upper bound on what planning could show."""
        rate = self.policy.pooled.rate
        return {
            drafter: max(map(rate, drafter.proposal_kinds()), default=0.0)
            for drafter in self.drafters.values()
        }

    def _row_policies(self, batch: DecodeBatch) -> list[RowPolicy]:
        """[rows]: the policy's state of each row of `batch`, looked up once per batch (the
        layout keeps a batch until a row joins or leaves; release() forgets it)."""
        cached = self._row_policies_of
        if cached is None or cached[0] is not batch:
            cached = self._row_policies_of = (batch, [self.policy.row(seq.slot) for seq in batch.rows])
        return cached[1]

    def record(self, seq: Sequence, drafter: Drafter, accepted: int) -> None:
        """The pooled acceptance of the row's kind of proposal learns the pass's verdict
        (`accepted` of its d_s drafts), for a row that goes on."""
        if self.policy is not None and seq.num_drafts:
            self.policy.pooled.record(drafter.proposal_kind(seq), seq.num_drafts, accepted)

    def absorb(self, seq: Sequence, accepted: int) -> None:
        """The row's own acceptance history learns the pass's verdict (a row that never
        drafts, k = 0, has none: it is never planned)."""
        if self.policy is not None and seq.k:
            self.policy.row(seq.slot).acceptance.update(seq.num_drafts, accepted)

    def release(self, seq: Sequence) -> None:
        """The row left its slot: the policy forgets it."""
        if self.policy is not None:
            self.policy.forget(seq.slot)
            self._row_policies_of = None
