"""The draft-length policy: how many drafts a pass verifies, from measured acceptance and
measured pass costs, so that speculation does not make decoding slower than plain decoding.

It picks the cap n on drafts per row with the most expected tokens per second,
sum over rows of E(a_r, min(L_r, n)) / t(B, n), where E(a, d) = (1 - a^(d+1)) / (1 - a) is
what a row proposing d drafts at acceptance a emits, and t(B, n) the measured cost of such a
pass. The model, its priors, its calibration and the planning backoff: docs/engine.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

# A kind of proposal never seen: above the break-even rate, so a new row tries; below it
# after one pass that accepted nothing (0.6 * 2 / 3 = 0.4).
PRIOR_RATE = 0.6
PRIOR_WEIGHT = 2.0  # a row's prior (its kind's pooled rate) counts as this many drafts
ACCEPT_DECAY = 0.9  # per pass that speculated, for a row's (or a kind's) acceptance history
IDLE_DECAY = 0.98  # per pass that did not: evidence ages towards the prior, so rows try again
COST_DECAY = 0.9  # per observation, for measured pass costs
OUTLIER = 4.0  # an observation this many times the estimate is a hiccup, not a new cost
EXTRAPOLATION_PER_DRAFT = 0.05  # an unmeasured width costs this much more per extra draft
# Calibration: about 20 passes of memory, a prior worth one pass that the model is right, and
# slow ageing while nothing speculates (it describes the workload more than one row's text).
CALIBRATION_DECAY = 0.95
CALIBRATION_IDLE_DECAY = 0.995
CALIBRATION_PRIOR_WEIGHT = 1.0
# Planning backoff: lookups that draft nothing take at most about this share of a plain
# pass's time, and a row skips at most this many passes' lookups in a row.
PLANNING_SHARE = 0.01
MAX_SKIPPED_PLANS = 15
PLANNING_COST_DECAY = 0.9


@dataclass
class AcceptanceEstimate:
    """One row's recent acceptance, as successes and failures of per-draft trials."""

    accepted: float = 0.0
    rejections: float = 0.0

    def update(self, proposed: int, accepted: int) -> None:
        """One pass of the row: `accepted` of its `proposed` drafts were accepted."""
        if proposed == 0:
            self.age()
        else:
            self.add(accepted, 1.0 if accepted < proposed else 0.0)

    def add(self, accepted: float, rejections: float) -> None:
        self.accepted = ACCEPT_DECAY * self.accepted + accepted
        self.rejections = ACCEPT_DECAY * self.rejections + rejections

    def age(self) -> None:
        """A pass without evidence: what is known counts for less, the prior for more."""
        self.accepted *= IDLE_DECAY
        self.rejections *= IDLE_DECAY

    def rate_with(self, prior: float) -> float:
        return (self.accepted + prior * PRIOR_WEIGHT) / (self.accepted + self.rejections + PRIOR_WEIGHT)

    @property
    def rate(self) -> float:
        return self.rate_with(PRIOR_RATE)


@dataclass
class PooledAcceptance:
    """Every row's drafts, by kind of proposal: the prior of each row's own estimate (a
    kind, e.g. an n-gram match length, tells good proposals from poor ones better than a
    row's few passes can). Updated once per pass, so its memory is counted in passes."""

    kinds: dict[Hashable, AcceptanceEstimate] = field(default_factory=dict)
    # This pass's sums by kind: [accepted drafts, rejections].
    _pass: dict[Hashable, list[float]] = field(default_factory=dict, init=False, repr=False)

    def rate(self, kind: Hashable) -> float:
        estimate = self.kinds.get(kind)
        return PRIOR_RATE if estimate is None else estimate.rate

    def record(self, kind: Hashable, proposed: int, accepted: int) -> None:
        """A row of this pass proposed `proposed` drafts of this kind (> 0); `accepted` passed."""
        sums = self._pass.get(kind)
        if sums is None:
            sums = self._pass[kind] = [0.0, 0.0]
        sums[0] += accepted
        sums[1] += accepted < proposed

    def end_pass(self) -> None:
        for kind in self._pass:
            self.kinds.setdefault(kind, AcceptanceEstimate())
        for kind, estimate in self.kinds.items():
            sums = self._pass.get(kind)
            if sums is None:
                estimate.age()
            else:
                estimate.add(*sums)
        self._pass.clear()


def batch_bucket(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


@dataclass
class Calibration:
    """Realized over predicted tokens per second of a bucket's speculating passes."""

    ratios: float = 0.0  # decayed sum of realized / predicted
    passes: float = 0.0  # decayed count

    def add(self, ratio: float) -> None:
        self.ratios = CALIBRATION_DECAY * self.ratios + ratio
        self.passes = CALIBRATION_DECAY * self.passes + 1.0

    def age(self) -> None:
        self.ratios *= CALIBRATION_IDLE_DECAY
        self.passes *= CALIBRATION_IDLE_DECAY

    @property
    def factor(self) -> float:
        return (self.ratios + CALIBRATION_PRIOR_WEIGHT) / (self.passes + CALIBRATION_PRIOR_WEIGHT)


@dataclass
class RowPlanning:
    """One row's planning backoff (PlanningBackoff)."""

    declined: int = 0  # the row's last planned passes, in a row, in which it drafted nothing
    skipping: int = 0  # passes left in which it does not look up a proposal


@dataclass
class PlanningBackoff:
    """Which rows look up their proposals for the coming pass: lookups run on the host with
    the GPU idle, and a row whose lookups keep drafting nothing looks up less often. A row
    whose last d planned passes drafted nothing skips the next min(2^(d-1), limit) passes'
    lookups, limit keeping the time lost near PLANNING_SHARE of a plain pass (0 where
    lookups are cheap against a pass); a pass in which it drafts resets it."""

    seconds: dict[int, float] = field(default_factory=dict)  # one row's planning, by batch bucket
    skipped: int = 0  # row lookups skipped, in all
    limit: int = 0  # this pass's bound on a row's skipped passes

    def start_pass(self, rows: int, lookups: int, plain_pass: float | None) -> None:
        """A pass over `rows` rows (its batch size), `lookups` of which may look up their
        proposals (DecodeBatch.backoff_rows: those that draft and whose drafter plans on the host);
        plain_pass: the measured cost of a plain pass at this batch size (None: not measured
        yet, no backoff)."""
        per_row = self.seconds.get(batch_bucket(rows))
        if per_row is None or not plain_pass:
            self.limit = 0
        else:
            # A row in a steady decline looks up once in limit + 1 passes: the least limit
            # that keeps the lookups' time within PLANNING_SHARE of a plain pass (rounded to
            # a millionth first, so that an exact ratio is not pushed up by float error).
            ratio = round(per_row * lookups / plain_pass / PLANNING_SHARE, 6)
            self.limit = max(0, min(MAX_SKIPPED_PLANS, math.ceil(ratio) - 1))

    def due(self, row: RowPlanning) -> bool:
        """True when the row looks up its proposal this pass (counts a skip otherwise). A
        skip earned under a higher limit (a larger batch) is cut to this pass's limit."""
        row.skipping = min(row.skipping, self.limit)
        if row.skipping:
            row.skipping -= 1
            self.skipped += 1
            return False
        return True

    def measured(self, rows: int, seconds: float, planned: int) -> None:
        """`planned` rows of a pass over `rows` rows planned in `seconds`."""
        if not planned:
            return
        bucket, per_row = batch_bucket(rows), seconds / planned
        previous = self.seconds.get(bucket)
        self.seconds[bucket] = (
            per_row
            if previous is None
            else (PLANNING_COST_DECAY * previous + (1 - PLANNING_COST_DECAY) * per_row)
        )

    def planned(self, row: RowPlanning, drafted: bool) -> None:
        """The row planned this pass, and drafts in it (or not)."""
        if drafted:
            row.declined = 0
            return
        row.declined += 1
        row.skipping = min(1 << min(row.declined - 1, 8), self.limit)


@dataclass
class RowPolicy:
    """What the policy knows of one row: its acceptance and its planning backoff."""

    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    planning: RowPlanning = field(default_factory=RowPlanning)


@dataclass
class _Cost:
    seconds: float = 0.0
    seen: int = 0  # observations, the discarded first one included


class DraftLengthPolicy:
    def __init__(self) -> None:
        self._costs: dict[tuple[int, int, bool], _Cost] = {}
        # The steady-state costs again, by (batch bucket, draft model) and then drafts: what
        # every decision reads, kept up to date by observe() rather than rebuilt per decision.
        self._steady: dict[tuple[int, bool], dict[int, float]] = {}
        self.choices: Counter[tuple[int, int]] = Counter()  # (batch bucket, cap) -> passes
        self.pooled = PooledAcceptance()  # the rows' prior, by kind of proposal
        self.calibration: dict[int, Calibration] = {}  # by batch bucket
        self._promised: tuple[int, int, float] | None = None  # (bucket, cap, tokens/s) of the last choice
        self.planning = PlanningBackoff()
        self._rows: dict[int, RowPolicy] = {}  # by slot

    def row(self, slot: int) -> RowPolicy:
        """The state of the row in `slot` (fresh for a row not seen yet)."""
        row = self._rows.get(slot)
        if row is None:
            row = self._rows[slot] = RowPolicy()
        return row

    def forget(self, slot: int) -> None:
        """The row in `slot` left it."""
        self._rows.pop(slot, None)

    def costs(self) -> dict[tuple[int, int, bool], float]:
        """The measured steady-state pass costs, seconds by (batch bucket, drafts, draft model)."""
        return {key: cost.seconds for key, cost in self._costs.items() if cost.seen >= 2}

    def observe(
        self, rows: int, drafts: int, draft_model: bool, seconds: float, tokens: int | None = None
    ) -> None:
        """A pass over `rows` rows that verified up to `drafts` drafts took `seconds` and
        emitted `tokens` (None: not known; the calibration then learns nothing)."""
        bucket = batch_bucket(rows)
        key = (bucket, drafts, draft_model)
        promised, self._promised = self._promised, None
        cost = self._costs.get(key)
        if cost is None:
            cost = self._costs[key] = _Cost()
        cost.seen += 1
        if cost.seen == 1:
            return  # first use of a shape: capture and compilation, not the steady state
        if cost.seen > 2 and seconds >= OUTLIER * cost.seconds:
            return  # a stall: says nothing about the cost, nor about the calibration
        calibration = self.calibration.get(bucket)
        if calibration is None:
            calibration = self.calibration[bucket] = Calibration()
        if promised is not None and promised[:2] == (bucket, drafts) and tokens is not None:
            calibration.add((tokens / seconds) / promised[2])
        elif drafts == 0:
            calibration.age()
        if cost.seen == 2:
            cost.seconds = seconds
            # A shape turned steady: rebuild its bucket's view, in the order the shapes were
            # first seen (which _estimate's tie-breaking between equally near widths follows).
            self._steady[(bucket, draft_model)] = {
                n: c.seconds
                for (b, n, dm), c in self._costs.items()
                if b == bucket and dm == draft_model and c.seen >= 2
            }
            return
        cost.seconds = COST_DECAY * cost.seconds + (1 - COST_DECAY) * seconds
        self._steady[(bucket, draft_model)][drafts] = cost.seconds

    def plain_cost(self, rows: int) -> float | None:
        """The measured steady-state cost of a plain pass over `rows` rows (None: not yet)."""
        return self._measured(batch_bucket(rows), False).get(0)

    def _measured(self, bucket: int, draft_model: bool) -> dict[int, float]:
        """Steady-state pass costs of one batch bucket, by number of drafts (read only)."""
        return self._steady.get((bucket, draft_model), {})

    @staticmethod
    def _estimate(measured: dict[int, float], drafts: int) -> float | None:
        if drafts in measured:
            return measured[drafts]
        if not measured:
            return None
        nearest = min(measured, key=lambda n: abs(n - drafts))
        return measured[nearest] * (1.0 + EXTRAPOLATION_PER_DRAFT * (drafts - nearest))

    def _complete(self, bucket: int, draft_model: bool) -> bool:
        """Whether the bucket has a measured pass without a draft model and a measured
        drafting pass (n > 0) of the kind asked for."""
        drafting = self._measured(bucket, draft_model)
        return bool(self._measured(bucket, False)) and any(n > 0 for n in drafting)

    def _cap_costs(
        self, bucket: int, draft_model: bool
    ) -> tuple[Callable[[int], float | None], Callable[[int], bool]]:
        """t(bucket, n) for every cap n (None: unknown), and which caps' costs are borrowed.

        A bucket that lacks measured drafting passes, or (with a draft model) passes free of
        it, borrows the missing half from the nearest complete bucket: that bucket's cost of
        each cap relative to its plain pass, scaled by what this bucket measured, rather
        than drafting as asked until its own costs are measured (docs/engine.md, "Costs").
        What the bucket measured itself is used as measured. A borrowed cost is a guess; the
        passes it chooses are measured and replace it. No complete bucket anywhere: the
        bucket's own measurements, extrapolated (None where it has none).
        """
        plain, drafting = self._measured(bucket, False), self._measured(bucket, draft_model)
        has_plain, has_drafting = bool(plain), any(n > 0 for n in drafting)

        def own(n: int) -> float | None:
            return self._estimate(drafting if n > 0 else plain, n)

        def not_borrowed(n: int) -> bool:
            return False

        if has_plain and has_drafting:
            return own, not_borrowed
        donors = [b for b, dm in self._steady if dm == draft_model and self._complete(b, dm)]
        if not donors:
            return own, not_borrowed
        # Nearest in log2 of the batch size; a tie goes to the larger bucket, whose verify
        # passes cost relatively more (the cautious guess).
        donor = min(donors, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))
        donor_plain, donor_drafting = self._measured(donor, False), self._measured(donor, draft_model)

        def donor_cost(n: int) -> float:
            return self._estimate(donor_drafting if n > 0 else donor_plain, n)

        if has_plain:  # drafting passes borrowed, on this bucket's plain pass
            base = donor_cost(0)
            if base <= 0:  # an extrapolation gone below zero: nothing sensible to scale by
                return own, not_borrowed
            scale = own(0) / base
            return (lambda n: own(n) if n == 0 else scale * donor_cost(n)), (lambda n: n > 0)
        if has_drafting:  # the plain pass borrowed, from a drafting width this bucket measured
            width = min(n for n in drafting if n > 0)
            base = donor_cost(width)
            if base <= 0:
                return own, not_borrowed
            scale = drafting[width] / base
            return (lambda n: scale * donor_cost(0) if n == 0 else own(n)), (lambda n: n == 0)
        return donor_cost, lambda n: True  # nothing measured here: the donor's own costs

    def choose(
        self,
        rows: int,
        available: list[int],
        rates: list[float],
        floor: int,
        draft_model: bool,
        plain_rows: int = 0,
    ) -> int:
        """The cap n on drafts per row for the coming pass.

        available[r]: drafts row r could propose (L_r); rates[r]: its acceptance estimate;
        floor: the smallest allowed cap (rows that must keep their drafts, e.g. seeded
        sampling); draft_model: whether a draft model runs in this pass; plain_rows: the
        pass's other rows, which propose nothing (one token each; left out of the lists so
        that a pass's planning costs what its proposing rows do).
        """
        cap, rate = self._best(rows, available, rates, floor, draft_model, plain_rows)
        bucket = batch_bucket(rows)
        self.choices[(bucket, cap)] += 1
        self._promised = (bucket, cap, rate) if cap > 0 and rate > 0 else None
        return cap

    def best_cap(
        self,
        rows: int,
        available: list[int],
        rates: list[float],
        floor: int,
        draft_model: bool,
        plain_rows: int = 0,
    ) -> int:
        """What choose() would answer, without counting it as a choice."""
        return self._best(rows, available, rates, floor, draft_model, plain_rows)[0]

    def best_cap_alike(
        self, rows: int, count: int, drafts: int, rate: float, draft_model: bool, plain_rows: int = 0
    ) -> int:
        """best_cap() for `count` rows that could each propose `drafts` at `rate` (and
        `plain_rows` that propose nothing), at a cost that does not grow with the rows. Rows
        that propose at most `drafts` at rates of at most `rate` expect no more tokens at any
        cap, the same at cap 0: where this answers 0, so does best_cap() for them, but for a
        cap whose rate ties cap 0's to the last bit (count * p and a sum of p round apart)."""
        if drafts <= 0:
            return 0
        gain = [0.0] * (drafts + 1)
        p = 1.0
        for d in range(1, drafts + 1):
            p *= rate
            gain[d] = count * p
        return self._best_of_gains(rows, gain, count + plain_rows, 0, draft_model)[0]

    def _best(
        self,
        rows: int,
        available: list[int],
        rates: list[float],
        floor: int,
        draft_model: bool,
        plain_rows: int = 0,
    ) -> tuple[int, float]:
        """The best cap (by calibrated prediction) and the model's own prediction of its
        tokens per second, before calibration (0.0: no prediction, when nothing is measured
        yet, the chosen cap's cost is borrowed (_cap_costs) or no cap above the floor is
        possible)."""
        most = max(available, default=0)
        if most <= floor:
            return most, 0.0
        # sum_r E(a_r, min(L_r, cap)) = R + sum_{d <= cap} gain[d], gain[d] = sum of a_r^d over
        # the rows with L_r >= d (draft d counts when it and every draft before it pass):
        # one multiplication per proposable draft instead of one power per row and cap.
        gain = [0.0] * (most + 1)
        for drafts, rate in zip(available, rates):
            p = 1.0
            for d in range(1, drafts + 1):
                p *= rate
                gain[d] += p
        return self._best_of_gains(rows, gain, len(available) + plain_rows, floor, draft_model)

    def _best_of_gains(
        self, rows: int, gain: list[float], row_count: int, floor: int, draft_model: bool
    ) -> tuple[int, float]:
        """_best() from the gains by draft (gain[d], d = 1..most: what the d-th drafts add
        to the tokens the pass's `row_count` rows expect; most > floor)."""
        bucket = batch_bucket(rows)
        most = len(gain) - 1
        # A cap of 0 runs no draft model, larger caps may.
        cost, borrowed = self._cap_costs(bucket, draft_model)
        calibration = self.calibration.get(bucket)
        factor = calibration.factor if calibration is not None else 1.0
        tokens = float(row_count)
        best, best_rate, best_model_rate = most, -1.0, 0.0
        for cap in range(most + 1):
            tokens += gain[cap]  # gain[0] = 0
            if cap < floor:
                continue
            seconds = cost(cap)
            if seconds is None:
                return most, 0.0  # nothing to go by for this bucket yet: run as asked, and measure
            model_rate = tokens / seconds
            calibrated = model_rate * factor if cap > 0 else model_rate
            if calibrated > best_rate:
                best, best_rate, best_model_rate = cap, calibrated, model_rate
        # A prediction from a borrowed cost is not held against the model (the calibration).
        return best, 0.0 if borrowed(best) else best_model_rate
