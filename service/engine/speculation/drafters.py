"""Drafters: what proposes the draft tokens of a decode pass.

One small interface, three implementations: no drafter (plain decoding), n-gram prompt
lookup over the request's own tokens, and a draft model with its own KV cache kept in step
with the target's. The number of drafts a row proposes (d_s) is always decided on the host
before the verify forward, so the counters never need a device read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from service.engine.api import Method
from service.engine.execution.device import to_device
from service.engine.execution.runner import ModelRunner
from service.engine.prefill import allocate
from service.engine.sequence import Sequence
from service.engine.speculation.sampling import BatchSampling, probs_from_logits, sample_from


@dataclass
class PassContext:
    """Per-pass batch data shared by drafters and the verifier; rows are slots [0, hi)."""

    hi: int
    device: torch.device
    sampling: BatchSampling  # [hi] rows; free slots are greedy dummies
    u_draft: torch.Tensor  # [hi, K] uniforms for sampling drafts (K = the engine's max k)
    u_accept: torch.Tensor  # [hi, K] uniforms for the acceptance test
    u_bonus: torch.Tensor  # [hi] uniforms for the bonus/correction token
    by_slot: list[Sequence | None]  # [hi] the decoding rows by slot (None: a free or prefilling slot)


@dataclass
class DraftOutput:
    tokens: torch.Tensor  # [hi, n] long; only this drafter's rows (and their first d_s) matter
    probs: torch.Tensor | None  # [hi, n, V] draft distributions q, or None for one-hot drafters


class Drafter(ABC):
    method: Method
    # True when the drafts are decided on the host by plan(): then host_drafts() gives them
    # and the scheduler uploads them with the pass's other inputs instead of calling propose().
    drafts_on_host: bool = False
    catch_ups: int = 0  # eager passes prepare() ran; such passes are not steady-state costs

    def start(self, seq: Sequence) -> None:  # noqa: B027
        """Called when the row is admitted: its prompt is known, nothing of it is cached yet."""

    @abstractmethod
    def plan(self, seq: Sequence, limit: int) -> int:
        """Host side: how many drafts (d_s <= limit) this row proposes in the coming pass."""

    def prepare(self, seq: Sequence) -> None:  # noqa: B027
        """Before a pass in which this drafter proposes, for each of its rows: per-row work
        that may fail that row alone (the scheduler runs it guarded, before the pass)."""

    def ready(self, seq: Sequence) -> bool:
        """After prepare(): whether the row can propose in this pass (a draft model that has
        not caught up with the row's tokens cannot)."""
        return True

    def prepare_rows(self, rows: list[Sequence]) -> None:  # noqa: B027
        """Before prepare(): the part of the rows' preparation that pays batched (none by
        default). The scheduler then runs prepare() row by row, guarded, whether this
        succeeded or raised, so prepare() must leave a row already prepared as it is."""

    def propose(self, ctx: PassContext, rows: list[Sequence], n: int) -> DraftOutput:
        """Device side: the drafts of `rows` (n = the largest d_s among them, >= 1)."""
        raise NotImplementedError

    def host_drafts(self, seq: Sequence) -> list[int]:
        """The row's d_s drafts (drafts_on_host drafters only)."""
        raise NotImplementedError

    def commit(self, seq: Sequence, accepted: int) -> None:  # noqa: B027
        """After verification: `accepted` drafts of this row were accepted."""

    def release(self, seq: Sequence) -> None:  # noqa: B027
        """The row left its slot (finished, failed or cancelled, started or not): its state goes."""

    def while_device_runs(self, seq: Sequence) -> None:  # noqa: B027
        """Host work for later passes, done while the device runs this one (after the
        target's launch, before the pass's synchronisation), off the pass's critical path:
        in every prefill pass while the row prefills, then in every decode pass."""

    def proposal_kinds(self) -> tuple[Hashable, ...]:
        """Every kind of proposal this drafter makes (the adaptive policy pools acceptance
        by kind: service.engine.speculation.draft_length_policy.PooledAcceptance)."""
        return (self.method,)

    def proposal_kind(self, seq: Sequence) -> Hashable:
        """The kind of the row's proposal in the coming pass (after plan())."""
        return self.method


class NoDrafter(Drafter):
    method = Method.NONE
    drafts_on_host = True  # ... and never any

    def plan(self, seq: Sequence, limit: int) -> int:
        return 0

    def proposal_kinds(self) -> tuple[Hashable, ...]:
        return ()


class NgramIndex:
    """Where every n-gram (min_n <= n <= max_n) of a growing token list occurs.

    Prompt lookup: match the last n tokens (n from max_n down to min_n) earlier in the
    sequence and propose up to `limit` tokens that followed the match; prefer the latest
    match with a full-length continuation, else the earliest (longest continuation); [] on
    a miss. Kept incrementally, a pass costs O(max_n) per new token instead of a scan of
    the whole sequence per row (tests/engine/test_units.py holds the scanning reference).

    Per n, the occurrences of an n-gram form a chain over start positions:
    `latest[key]` is its last start, `earlier[s]` the start of the occurrence before the
    one at s (-1: none) and `first[s]` the first occurrence's start. A key is the n token
    ids packed into one int, 32 bits each. Nothing here is a container per n-gram: ints are
    not tracked by the cycle collector, whose full collections stall decoding (docs/engine.md).
    """

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self._latest: list[dict[int, int]] = [{} for _ in range(max_n + 1)]  # [n]: key -> last start
        self._earlier: list[list[int]] = [[] for _ in range(max_n + 1)]  # [n][start]
        self._first: list[list[int]] = [[] for _ in range(max_n + 1)]  # [n][start]
        self._indexed = 0  # tokens[:_indexed] are indexed
        self.matched = 0  # the match length n of the last lookup's proposal (0: none)

    def extend(self, tokens: list[int], upto: int | None = None) -> None:
        """Indexes the tokens not indexed yet, up to tokens[:upto] (all by default). lookup()
        first indexes all but the last token itself: the n-grams that end with the last token
        are the suffixes it matches, and need not be in the index for that, so the drafter
        indexes them while the device runs the next pass."""
        upto = len(tokens) if upto is None else min(upto, len(tokens))
        for end in range(self._indexed + 1, upto + 1):  # the n-grams ending just before `end`
            key = 0
            for n in range(1, min(self.max_n, end) + 1):
                start = end - n
                key |= tokens[start] << (32 * (n - 1))  # tokens[start:end], the oldest highest
                if n < self.min_n:
                    continue
                earlier = self._latest[n].get(key, -1)
                self._earlier[n].append(earlier)  # at index `start`: starts are indexed in order
                self._first[n].append(self._first[n][earlier] if earlier >= 0 else start)
                self._latest[n][key] = start
        self._indexed = max(self._indexed, upto)

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        self.matched = 0
        length = len(tokens)
        if limit <= 0 or length < 2:
            return []  # the index catches up with the tokens at the next real lookup
        if self._indexed < length - 1:
            self.extend(tokens, length - 1)
        keys = [0] * (self.max_n + 1)  # keys[n]: the last n tokens
        for n in range(1, min(self.max_n, length - 1) + 1):
            keys[n] = keys[n - 1] | tokens[length - n] << (32 * (n - 1))
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):  # longest n first
            # The suffix itself where its last token is indexed, else the occurrence before
            # it (every other occurrence ends before the last token: indexed); -1: none.
            latest = self._latest[n].get(keys[n], -1)
            # The latest occurrence followed by `limit` tokens: walking back from there
            # passes only occurrences that start in the last `limit` positions (the suffix
            # among them).
            start = latest
            while start >= 0 and start > length - n - limit:
                start = self._earlier[n][start]  # -1: the chain has ended
            if start < 0:  # none that long: the earliest occurrence, if something follows it
                if latest < 0:
                    continue
                start = self._first[n][latest]
                if start > length - 1 - n:
                    continue
            self.matched = n
            return tokens[start + n : start + n + limit]
        return []


@dataclass
class NgramRow:
    """An n-gram row's state: its index and the proposal of the coming pass."""

    index: NgramIndex
    proposal: list[int] = field(default_factory=list)


class NgramDrafter(Drafter):
    method = Method.NGRAM
    drafts_on_host = True

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self._kinds = tuple((self.method, n) for n in range(max_n + 1))  # [n]: proposals from n-token matches
        self.rows: dict[int, NgramRow] = {}  # by slot: the rows started and not released

    def start(self, seq: Sequence) -> None:
        self.rows[seq.slot] = NgramRow(NgramIndex(self.max_n, self.min_n))

    def release(self, seq: Sequence) -> None:
        self.rows.pop(seq.slot, None)

    def plan(self, seq: Sequence, limit: int) -> int:
        row = self.rows[seq.slot]
        row.proposal = row.index.lookup(seq.tokens, limit)
        return len(row.proposal)

    def proposal_kinds(self) -> tuple[Hashable, ...]:
        return self._kinds[self.min_n :]

    def proposal_kind(self, seq: Sequence) -> Hashable:
        return self._kinds[self.rows[seq.slot].index.matched]  # the longer the match, the likelier the drafts

    def host_drafts(self, seq: Sequence) -> list[int]:
        return self.rows[seq.slot].proposal[: seq.num_drafts]

    def while_device_runs(self, seq: Sequence) -> None:
        # The prompt chunk by chunk while the device prefills it (up to what is cached, so the
        # host's work follows the device's), then what each decode pass added, lookups or
        # not (the policy skips them when drafting cannot pay): otherwise a lookup indexes
        # it all, on the host between two passes, with the GPU idle.
        self.rows[seq.slot].index.extend(seq.tokens, None if seq.decoding else seq.target_len)


@dataclass
class DraftRow:
    """A draft-model row's state."""

    cached: int = 0  # tokens whose KV is valid in the draft model's cache
    steps: int = 0  # draft forward steps run this pass


class DraftModelDrafter(Drafter):
    """A smaller model sharing the target's vocabulary, with its own static KV cache.

    Its cache holds each row's sequence up to the row's `cached` length (DraftRow). A pass
    first feeds the tokens it has not seen (the last pass's bonus token, plus the last draft
    when all drafts were accepted), then drafts autoregressively. After verification the
    cache is rolled back to the accepted prefix by resetting `cached`; nothing is copied.
    """

    method = Method.DRAFT_MODEL

    def __init__(self, runner: ModelRunner, catch_up_budget: int = 2048) -> None:
        if catch_up_budget < 1:
            raise ValueError(f"catch_up_budget must be >= 1, not {catch_up_budget}")
        self.runner = runner
        # Tokens the catch-ups of one pass feed at most: the draft model's prefill of a long
        # prompt goes in chunks, as the target's does (docs/prefill.md).
        self.catch_up_budget = catch_up_budget
        self._budget_left = catch_up_budget  # of the current pass (reset by prepare_rows)
        self.rows: dict[int, DraftRow] = {}  # by slot: the rows started and not released

    def _cached(self, seq: Sequence) -> int:
        """Tokens of the row (of any drafter) whose KV is valid in the draft model's cache."""
        row = self.rows.get(seq.slot)
        return row.cached if row is not None else 0

    def start(self, seq: Sequence) -> None:
        # The draft's prefill waits for the row's first drafting pass (prepare): with the
        # adaptive draft length, a row may never draft.
        self.rows[seq.slot] = DraftRow()

    def release(self, seq: Sequence) -> None:
        self.rows.pop(seq.slot, None)

    def plan(self, seq: Sequence, limit: int) -> int:
        return limit

    def ready(self, seq: Sequence) -> bool:
        # One or two unseen tokens: the pass feeds them.
        return len(seq.tokens) - 1 - self.rows[seq.slot].cached <= 1

    def prepare(self, seq: Sequence) -> None:
        """Feeds the row's tokens the draft has not seen, all but the last (the pass feeds
        that one), in an eager pass of its own: the prompt the first time a row drafts, plus
        whatever was generated while it did not; at most what is left of this pass's
        catch-up budget (the rest in later passes: until then the row is not ready()). The
        scheduler calls it per row, guarded, so a failure (out of memory on a long prompt)
        fails that request alone."""
        row = self.rows[seq.slot]
        behind = seq.tokens[row.cached : -1]
        if len(behind) > 1 and self._budget_left > 0:  # one or two unseen tokens are a normal pass's business
            behind = behind[: self._budget_left]
            ids = to_device([behind], torch.long, self.runner.device)  # [1, L]
            self.runner.forward(seq.slot, seq.slot + 1, ids, [row.cached], last_only=True)
            row.cached += len(behind)
            self._budget_left -= len(behind)
            self.catch_ups += 1

    def prepare_rows(self, rows: list[Sequence]) -> None:
        """Feeds the backlogs of the rows behind in batched eager forwards; prepare() does
        whatever is left (a row alone, or a failed batch) row by row.

        When the policy turns drafting on, every row is behind (the prompt, or what was
        generated while it did not draft), and one forward costs about what each row's own
        would (launch-bound; docs/engine.md). A forward covers the slot
        span of its rows; row r's backlog goes to positions cached .. + L_r - 1,
        zero-padded to the longest backlog, and a slot of the span that is not in the group
        gets padding only, written from its own cached length on (or, for a slot the draft model
        does not serve, anywhere): past every row's valid length, as a verify pass's padded
        drafts are. Groups are split while padding would more than double the tokens fed
        (one long prompt among short backlogs runs on its own).
        """
        self._budget_left = self.catch_up_budget  # prepare_rows comes first in every pass that drafts
        served = {seq.slot: seq for seq in rows}
        late = [seq for seq in rows if not self.ready(seq)]
        chunks = allocate(
            [len(seq.tokens) - 1 - self.rows[seq.slot].cached for seq in late], self.catch_up_budget
        )
        self._catch_up(
            [seq for seq, chunk in zip(late, chunks) if chunk],
            {seq.slot: chunk for seq, chunk in zip(late, chunks)},
            served,
        )

    def _catch_up(self, late: list[Sequence], chunks: dict[int, int], served: dict[int, Sequence]) -> None:
        """Feeds chunks[slot] backlog tokens of each late row, batched."""
        if len(late) < 2:
            return  # prepare() feeds a row alone
        backlog = {seq.slot: chunks[seq.slot] for seq in late}
        width = max(backlog.values())
        lo, hi = min(backlog), max(backlog) + 1
        if (hi - lo) * width > 2 * sum(backlog.values()) + 16 * (hi - lo):
            long = [seq for seq in late if 2 * backlog[seq.slot] > width]
            short = [seq for seq in late if 2 * backlog[seq.slot] <= width]
            if not short:  # similar backlogs in a sparse span: split the span
                by_slot = sorted(late, key=lambda seq: seq.slot)
                long, short = by_slot[: len(by_slot) // 2], by_slot[len(by_slot) // 2 :]
            self._catch_up(long, chunks, served)
            self._catch_up(short, chunks, served)
            return
        ids = [[0] * width for _ in range(hi - lo)]  # [hi - lo, L]
        starts = [0] * (hi - lo)
        for r in range(hi - lo):
            seq = served.get(lo + r)
            if seq is not None:
                starts[r] = self.rows[seq.slot].cached
        for seq in late:
            cached = self.rows[seq.slot].cached
            ids[seq.slot - lo][: backlog[seq.slot]] = seq.tokens[cached : cached + backlog[seq.slot]]
        self.runner.forward(lo, hi, to_device(ids, torch.long, self.runner.device), starts, last_only=True)
        for seq in late:
            self.rows[seq.slot].cached += backlog[seq.slot]
            self._budget_left -= backlog[seq.slot]
        self.catch_ups += 1

    def propose(self, ctx: PassContext, rows: list[Sequence], n: int) -> DraftOutput:
        # The scheduler ran prepare() for every row, so each has one or two unseen tokens
        # (a longer backlog would still be right here, in one wider eager pass).
        lo, hi = min(s.slot for s in rows), max(s.slot for s in rows) + 1
        # 1 token (the bonus; the last after a catch-up), 2 after a pass that accepted every draft
        unseen = {s.slot: s.tokens[self.rows[s.slot].cached :] for s in rows}
        width = max(len(t) for t in unseen.values())
        ids, starts, last = [[0] * width for _ in range(hi - lo)], [0] * (hi - lo), [0] * (hi - lo)
        for r in range(hi - lo):  # a row of the span that does not propose writes past its draft cache
            other = ctx.by_slot[lo + r] if lo + r < len(ctx.by_slot) else None
            if other is not None:
                starts[r] = self._cached(other)
        for seq in rows:
            r = seq.slot - lo
            ids[r][: len(unseen[seq.slot])] = unseen[seq.slot]
            starts[r], last[r] = self.rows[seq.slot].cached, len(unseen[seq.slot]) - 1
        device = self.runner.device
        logits = self.runner.forward(lo, hi, to_device(ids, torch.long, device), starts)  # [B, W, V]
        logits = logits[torch.arange(hi - lo, device=device), to_device(last, torch.long, device)]  # [B, V]
        sampling = ctx.sampling.slice(lo, hi)
        tokens, probs = [], []
        for i in range(n):
            if sampling.all_greedy:
                x = logits.argmax(-1)  # [B]
            else:
                q = probs_from_logits(logits[:, None], sampling)[:, 0]  # [B, V]
                x = sample_from(q, ctx.u_draft[lo:hi, i])  # [B]
                probs.append(q)
            tokens.append(x)
            if i + 1 < n:
                # Draft i + 1 goes right after the unseen tokens and drafts 1..i.
                step_starts = [st + lst + 1 + i for st, lst in zip(starts, last)]
                logits = self.runner.forward(lo, hi, x[:, None], step_starts)[:, 0]  # [B, V]
        for seq in rows:
            self.rows[seq.slot].steps = n
        out = torch.zeros((ctx.hi, n), dtype=torch.long, device=device)  # [hi, n]
        out[lo:hi] = torch.stack(tokens, dim=1)
        full_probs = None
        if probs:
            full_probs = torch.zeros((ctx.hi, n, logits.shape[-1]), device=device)  # [hi, n, V]
            full_probs[lo:hi] = torch.stack(probs, dim=1)
        return DraftOutput(out, full_probs)

    def commit(self, seq: Sequence, accepted: int) -> None:
        # Called before the pass's tokens are appended. The draft consumed the previous
        # tokens and its own drafts 1..steps-1, so it agrees with the new sequence up to
        # min(accepted, steps - 1) drafts; the rest is rolled back by length.
        row = self.rows[seq.slot]
        if row.steps > 0:
            row.cached = len(seq.tokens) + min(accepted, row.steps - 1)
        row.steps = 0
