"""Continuous batching: slots, admission, prefill passes, decode passes, release.

Runs on the engine thread only. Each running request owns one slot (a row of every KV
cache). An admitted request first prefills: every step runs one prefill pass over the rows
still prefilling (at most a budget of prompt tokens, batched across requests, long prompts
in chunks; docs/prefill.md), then one decode pass over the rows decoding, all of them
together, each row with its own length, drafts and verdict. A row joins the decode passes
once its prompt is in the cache; requests leave between passes.
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from service.engine.api import FinishReason, Method
from service.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from service.engine.execution.device import to_device
from service.engine.execution.runner import ModelRunner
from service.engine.output import OutputProcessor
from service.engine.prefill import allocate, forward_groups
from service.engine.sequence import Sequence
from service.engine.speculation.draft_length_policy import DraftLengthPolicy
from service.engine.speculation.drafters import Drafter, DraftModelDrafter, PassContext
from service.engine.speculation.sampling import GREEDY, BatchSampling, probs_from_logits, sample_from
from service.engine.speculation.verify import greedy_accepted, verify_rejection

log = structlog.get_logger(__name__)


class _Staging:
    """A decode pass's integer inputs reach the device in one copy, without a synchronisation.

    On CUDA the values are written into a persistent pinned host buffer and copied with one
    non_blocking copy into a persistent device buffer. From pinned memory the copy is only
    queued on the stream (from pageable memory it would be synchronous), so the pinned buffer
    must not be rewritten before the copy has run. The scheduler calls synchronized() right
    after the pass's one synchronisation, a device -> host copy on the same stream, which
    returns only once everything queued before it, this copy included, has run. A pass that
    fails before its synchronisation synchronises the stream in its error path
    (Scheduler.step) and so releases the buffer too; any other upload while a copy may
    still be pending goes through a fresh pinned block (service.engine.execution.device.to_device). The device
    buffer is reused in stream order: the next copy into it is queued behind every kernel
    of the previous pass that reads it.
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self._pending = False  # a copy out of the pinned buffer may not have run yet
        if device.type == "cuda":
            self._host = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._host_view = self._host.numpy()  # writes a Python list in one call
            self._dev = torch.empty(size, dtype=torch.long, device=device)
            # (host slice, device slice) per length: a view costs as much host time as a
            # small kernel launch, and the same few lengths recur pass after pass.
            self._slices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def upload(self, values: list[int]) -> torch.Tensor:
        """`values` as a [len(values)] long tensor on the device; valid until the next upload."""
        n = len(values)
        if self.device.type != "cuda" or n > self.size or self._pending:
            return to_device(values, torch.long, self.device)
        slices = self._slices.get(n)
        if slices is None:
            slices = self._slices[n] = (self._host[:n], self._dev[:n])
        self._host_view[:n] = values
        slices[1].copy_(slices[0], non_blocking=True)
        self._pending = True
        return slices[1]

    def synchronized(self) -> None:
        """The stream has been synchronised since the last upload: its copy has run."""
        self._pending = False


@dataclass
class _Batch:
    """What a decode pass needs to know about the running requests that changes only when a
    request joins or leaves: built once per composition, not once per pass."""

    rows: list[Sequence]  # by slot
    drafters: list[Drafter]  # rows[i]'s drafter
    hi: int  # rows occupy slots [0, hi)
    by_slot: list[Sequence | None]  # [hi]
    sampling: BatchSampling  # [hi] rows; free slots are greedy dummies
    greedy_context: PassContext | None  # the all-greedy pass context (no uniforms to draw)
    can_draft: bool  # some row has k > 0
    adapts: list[bool]  # per row: the adaptive policy may shorten its drafts (Scheduler._adapts)
    # Per row: its lookups are host work the planning backoff may skip (it adapts, and its
    # drafter plans on the host: n-gram; a draft model's plan() costs nothing).
    backs_off: list[bool]
    # Rows (k > 0) of drafters whose drafts exist only on the device, by drafter.
    device_groups: list[tuple[Drafter, list[Sequence]]]


class Scheduler:
    def __init__(
        self,
        target: ModelRunner,
        drafters: dict[Method, Drafter],
        output: OutputProcessor,
        tokenizer: object,
        max_batch: int,
        max_k: int,
        max_context: int,
        policy: DraftLengthPolicy | None = None,
        prefill_budget: int = 2048,
    ) -> None:
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, not {prefill_budget}")
        self.target = target
        self.prefill_budget = prefill_budget  # prompt tokens a prefill pass feeds at most
        self.drafters = drafters
        self.output = output
        self.tokenizer = tokenizer
        self.max_k = max_k
        self.max_context = max_context
        self.device = target.device
        self.policy = policy
        self.running: dict[int, Sequence] = {}  # by slot: every admitted request, prefilling or decoding
        self._prefilling: list[Sequence] = []  # rows whose prompt is not all cached yet, by admission
        self._free = list(range(max_batch))  # a min-heap: low slots first keeps batches dense
        self._batch: _Batch | None = None  # the running requests' pass layout; None = rebuild
        self._texts = TokenTexts(tokenizer)  # decoding shared by every request's detokenizer
        # ids [B, K + 1], then d_s [B], then one row mask [B] per device drafter
        self._staging = _Staging(self.device, max_batch * (max_k + 2 + len(drafters)))
        self._runners = [target] + [d.runner for d in drafters.values() if isinstance(d, DraftModelDrafter)]
        self._failed_in_pass: list[tuple[Sequence, Exception]] = []  # (row, error) of the running pass

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def prefilling(self) -> int:
        """Admitted requests whose prompt is not all prefilled yet."""
        return len(self._prefilling)

    def _release(self, seq: Sequence) -> None:
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            if seq.decoding:
                self._batch = None
            else:
                self._prefilling.remove(seq)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        log.exception("request_failed", request_id=seq.request_id)
        self.output.finish(seq, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")

    def _guarded(self, seq: Sequence, work: Callable[[], None]) -> None:
        """Runs one request's host-side work; an exception fails that request alone."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001
            self._fail(seq, exc)
        if seq.finished:
            self._release(seq)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        self.output.deliver_held()  # after a pass that broke off: rows already ended get theirs
        for seq in list(self.running.values()):
            self.output.finish(seq, reason, error)
            self._release(seq)

    def cancel_flagged(self) -> None:
        flagged = [seq for seq in self.running.values() if seq.handle.cancelled]
        for seq in flagged:
            self.output.finish(seq, FinishReason.CANCELLED)
            self._release(seq)

    # ---- admission -------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        """Takes a free slot; the prompt is prefilled by the coming steps' prefill passes."""
        seq.slot = heapq.heappop(self._free)
        self.running[seq.slot] = seq
        seq.timing.admitted = time.monotonic()

        def start() -> None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.seed)
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.tokens, seq.request.stop, self._texts)

        self._prefilling.append(seq)
        self._guarded(seq, start)

    # ---- one prefill pass ------------------------------------------------------------

    def _prefill_pass(self) -> None:
        """Feeds the prefilling rows' next prompt tokens, at most prefill_budget of them
        (service.engine.prefill.allocate), in one forward per group of nearby slots, padded
        to the group's longest chunk. A row whose prompt is then all cached samples its
        first token (all such rows' tokens cross to the host in one transfer), starts its
        drafter and joins the decode passes. A forward that fails fails its rows."""
        rows = list(self._prefilling)
        chunks = allocate([seq.prompt_len - seq.target_len for seq in rows], self.prefill_budget)
        chunk_of = {seq.slot: chunk for seq, chunk in zip(rows, chunks) if chunk}
        completed: list[tuple[Sequence, torch.Tensor]] = []  # (row, its last prompt token's logits [1, V])
        for group in forward_groups(chunk_of):
            lo, hi = group[0], group[-1] + 1
            width = max(chunk_of[slot] for slot in group)
            ids = [[0] * width for _ in range(hi - lo)]  # [hi - lo, width], zero padded
            lengths = [1] * (hi - lo)
            # Every slot of the span writes from its own cached length on: padding and the
            # slots of other requests land past what their rows have cached.
            starts = [0] * (hi - lo)
            for r in range(hi - lo):
                other = self.running.get(lo + r)
                if other is not None:
                    starts[r] = other.target_len
            for slot in group:
                seq, chunk = self.running[slot], chunk_of[slot]
                ids[slot - lo][:chunk] = seq.tokens[seq.target_len : seq.target_len + chunk]
                lengths[slot - lo] = chunk
            try:
                logits = self.target.forward(
                    lo, hi, to_device(ids, torch.long, self.device), starts, last_only=True, lengths=lengths
                )  # [hi - lo, 1, V]
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its rows, not the engine
                log.exception("prefill_pass_failed", rows=len(group))
                for slot in group:
                    seq = self.running[slot]
                    self.output.finish(
                        seq, FinishReason.ERROR, f"prefill failed: {type(exc).__name__}: {exc}"
                    )
                    self._release(seq)
                continue
            for slot in group:
                seq = self.running[slot]
                seq.target_len += chunk_of[slot]
                if seq.target_len == seq.prompt_len:
                    completed.append((seq, logits[slot - lo]))
        first: list[tuple[Sequence, torch.Tensor]] = []
        for seq, row_logits in completed:
            self._guarded(
                seq,
                lambda seq=seq, row_logits=row_logits: first.append(
                    (seq, self._first_token(seq, row_logits))
                ),
            )
        # While the device runs the prefill: the last decode pass's tokens, as a decode pass does.
        self.output.flush()
        for seq in list(self.running.values()):
            if seq.finished:
                self._release(seq)
        first = [(seq, token) for seq, token in first if not seq.finished]
        if not first:
            return
        tokens = torch.stack([token for _, token in first]).tolist()  # the pass's one device -> host transfer
        for (seq, _), token in zip(first, tokens):
            self._prefilling.remove(seq)
            seq.decoding = True
            self._batch = None
            self._guarded(seq, lambda seq=seq: self.drafters[seq.method].start(seq))
            if not seq.finished:
                self._guarded(seq, lambda seq=seq, token=token: self.output.emit(seq, [token]))

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from its last token's logits [1, V] (a 0-dim device tensor)."""
        if seq.sampling.greedy:
            return logits[0].argmax()
        probs = probs_from_logits(logits[None], BatchSampling.build([seq.sampling], self.device))  # [1, 1, V]
        u = torch.rand(1, generator=seq.generator, device=self.device)  # [1]
        return sample_from(probs[:, 0], u)[0]

    # ---- one decode pass -------------------------------------------------------------

    def _current_batch(self) -> _Batch:
        if self._batch is None:
            rows = [self.running[s] for s in sorted(self.running) if self.running[s].decoding]
            hi = rows[-1].slot + 1
            by_slot: list[Sequence | None] = [None] * hi
            for seq in rows:
                by_slot[seq.slot] = seq
            sampling = BatchSampling.build(
                [seq.sampling if seq is not None else GREEDY for seq in by_slot], self.device
            )
            greedy_context = None
            if sampling.all_greedy:
                u = self._uniforms(by_slot, hi, True)
                k = self.max_k
                greedy_context = PassContext(
                    hi, self.device, sampling, u[:, :k], u[:, k : 2 * k], u[:, 2 * k], by_slot
                )
            device_groups = []
            for method, drafter in self.drafters.items():
                group = [seq for seq in rows if seq.method is method and seq.k > 0]
                if group and not drafter.drafts_on_host:
                    device_groups.append((drafter, group))
            self._batch = _Batch(
                rows=rows,
                drafters=[self.drafters[seq.method] for seq in rows],
                hi=hi,
                by_slot=by_slot,
                sampling=sampling,
                greedy_context=greedy_context,
                can_draft=any(seq.k > 0 for seq in rows),
                adapts=[self._adapts(seq) for seq in rows],
                backs_off=[self._adapts(seq) and self.drafters[seq.method].drafts_on_host for seq in rows],
                device_groups=device_groups,
            )
        return self._batch

    def _uniforms(self, by_slot: list[Sequence | None], hi: int, all_greedy: bool) -> torch.Tensor:
        """[hi, 2K + 1]: each sampling row draws a fixed number from its own generator per
        pass, so its random stream does not depend on the batch it runs in."""
        width = 2 * self.max_k + 1
        if all_greedy:
            return torch.zeros((hi, width), device=self.device)
        zeros = torch.zeros(width, device=self.device)
        rows = []
        for seq in by_slot:
            if seq is None or seq.sampling.greedy:
                rows.append(zeros)
            else:
                rows.append(torch.rand(width, generator=seq.generator, device=self.device))
        return torch.stack(rows)

    def _context(self, batch: _Batch) -> PassContext:
        if batch.greedy_context is not None:
            return batch.greedy_context
        u = self._uniforms(batch.by_slot, batch.hi, False)  # [hi, 2K + 1]
        k = self.max_k
        return PassContext(
            batch.hi, self.device, batch.sampling, u[:, :k], u[:, k : 2 * k], u[:, 2 * k], batch.by_slot
        )

    def step(self) -> None:
        """One prefill pass over the rows prefilling, then one decode pass over every row
        decoding: draft, verify, accept, emit."""
        if self._prefilling:
            self._prefill_pass()
        if len(self.running) == len(self._prefilling):
            return
        batch = self._current_batch()
        rows = batch.rows
        policy = self.policy
        if policy is not None:
            started, captures = time.perf_counter(), self._captures()
        try:
            verdicts = self._draft_and_verify(batch)
        except Exception as exc:  # noqa: BLE001 - a batched failure fails the batch, not the engine
            log.exception("decode_pass_failed", batch=len(rows))
            self._failed_in_pass.clear()
            self._release_staging()
            self.output.deliver_held()  # rows that ended in the flush: the pass gave no verdict
            for seq in rows:
                self.output.finish(
                    seq, FinishReason.ERROR, f"decode pass failed: {type(exc).__name__}: {exc}"
                )
                self._release(seq)
            return
        if verdicts is None:  # a row failed before the pass; the others go on next step
            self.output.flush()
            for seq in rows:
                if seq.finished:
                    self._release(seq)
            return
        drafts = max(seq.num_drafts for seq in rows)
        draft_model = self._drafts_with_model(rows)
        # Rows that ended while this pass ran (a stop string or a failure found by the
        # flush, a drafter's failure): the pass ran for them, so it counts in their metrics,
        # with its drafts and verdict; its tokens are dropped (its accepted drafts are cut).
        failed = {id(seq) for seq, _ in self._failed_in_pass}
        for seq, (accepted, _) in zip(rows, verdicts):
            if seq.finished or id(seq) in failed:
                try:  # one request's bookkeeping: a failure must not end the others
                    seq.stats.record_pass(seq.num_drafts, accepted)
                    self.output.cut(seq, accepted)
                except Exception:  # noqa: BLE001
                    log.exception("pass_bookkeeping_failed", request_id=seq.request_id)
        for seq, exc in self._failed_in_pass:
            self._fail(seq, exc)
        self._failed_in_pass.clear()
        self.output.deliver_held()
        # Tokens this pass delivers: not those of rows that ended during the pass (a stop
        # string found by the flush, a drafter's failure above).
        emitted = sum(accepted + 1 for (accepted, _), seq in zip(verdicts, rows) if not seq.finished)
        for seq, drafter, (accepted, tokens) in zip(rows, batch.drafters, verdicts):
            if seq.finished:
                self._release(seq)
                continue
            if policy is not None and seq.num_drafts:
                policy.pooled.record(drafter.proposal_kind(seq), seq.num_drafts, accepted)
            try:  # one request's host-side work; an exception fails that request alone
                self._absorb(seq, drafter, accepted, tokens)
            except Exception as exc:  # noqa: BLE001
                self._fail(seq, exc)
            if seq.finished:
                self._release(seq)
        if policy is not None:
            policy.pooled.end_pass()
            # The pass is over, its tokens emitted: its cost is all of the engine thread's
            # time for it (planning and emitting grow with the drafts too). A pass that
            # captured a new graph (and compiled its kernels), or fed a draft model a row's
            # backlog eagerly, says nothing about the steady-state cost.
            if self._captures() == captures:
                policy.observe(batch.hi, drafts, draft_model, time.perf_counter() - started, emitted)

    def _absorb(self, seq: Sequence, drafter: Drafter, accepted: int, tokens: list[int]) -> None:
        seq.stats.record_pass(seq.num_drafts, accepted)
        try:
            seq.acceptance.update(seq.num_drafts, accepted)
            drafter.commit(seq, accepted)
        except Exception:
            self.output.cut(seq, accepted)  # the pass is counted; its tokens never go out
            raise
        seq.target_len += accepted + 1  # the pending token and the accepted drafts are cached now
        # The first `accepted` tokens are the drafts, the last one the target's own;
        # delivered by the next pass's flush (or now, if it ends).
        self.output.accept(seq, tokens, accepted)

    @staticmethod
    def _drafts_with_model(rows: list[Sequence]) -> bool:
        """Whether the draft model runs this pass (it runs only for rows that draft)."""
        return any(seq.method is Method.DRAFT_MODEL and seq.num_drafts > 0 for seq in rows)

    def _captures(self) -> int:
        """Graph captures plus draft-model catch-ups so far: passes that did one are not
        steady-state passes."""
        return sum(runner.captures for runner in self._runners) + sum(
            drafter.catch_ups for drafter in self.drafters.values()
        )

    def _release_staging(self) -> None:
        """After a failed pass: wait for the stream, so the pinned upload buffer is free again
        (otherwise every later pass would take the slower fresh-block path)."""
        try:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self._staging.synchronized()
        except Exception:  # noqa: BLE001 - a broken device: later uploads take the safe path
            log.exception("staging_release_failed")

    @staticmethod
    def _adapts(seq: Sequence) -> bool:
        """Whether the adaptive policy may shorten this row's drafts. Seeded sampled rows keep
        theirs: their random stream, and so their output, must not depend on timings."""
        return seq.sampling.greedy or seq.request.sampling.seed is None

    def _shorten_drafts(self, batch: _Batch, rates: list[float]) -> None:
        """Caps d_s by the adaptive policy."""
        rows = batch.rows
        fixed = [seq.num_drafts for seq, adapts in zip(rows, batch.adapts) if not adapts]
        cap = self.policy.choose(
            batch.hi,
            [seq.num_drafts for seq in rows],
            rates,
            max(fixed, default=0),
            self._drafts_with_model(rows),
        )
        for seq, adapts in zip(rows, batch.adapts):
            if adapts:
                seq.num_drafts = min(seq.num_drafts, cap)

    def _drafting_cannot_pay(self, batch: _Batch, limits: list[int]) -> bool:
        """True when plain decoding beats drafting even if every row proposed its whole limit
        at the best rate its drafter's proposals could have: then the drafters need not plan
        at all (an n-gram lookup per row per pass is host time a batch-32 pass notices).
        Only for batches whose drafts the policy may shorten (no fixed rows)."""
        rows, policy = batch.rows, self.policy
        # Before the lookups, each row's own evidence with the best prior any of its
        # drafter's kinds of proposal has: an upper bound on what planning could show.
        best_prior = {
            drafter: max(map(policy.pooled.rate, drafter.proposal_kinds()), default=0.0)
            for drafter in self.drafters.values()
        }
        bounds = [
            seq.acceptance.rate_with(best_prior[drafter]) if limit else 0.0
            for seq, drafter, limit in zip(rows, batch.drafters, limits)
        ]
        draft_model = any(seq.method is Method.DRAFT_MODEL and limit for seq, limit in zip(rows, limits))
        return policy.best_cap(batch.hi, limits, bounds, 0, draft_model) == 0

    def _plan_plain(self, batch: _Batch) -> None:
        """No row drafts in the coming pass (counted as the policy's choice of cap 0)."""
        for seq in batch.rows:
            seq.num_drafts = 0
        if self.policy is not None:
            self.policy.choose(batch.hi, [], [], 0, False)

    def _plan(self, batch: _Batch) -> None:
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
                if limits[i] and backs_off and not backoff.due(seq.planning):
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
            # A drafter proposes at most `limit` drafts: with none allowed, it need not plan.
            seq.num_drafts = drafter.plan(seq, limit) if limit else 0
            if limit and backs_off:
                looked_up.append(seq)
        if policy is None:
            return
        backoff.measured(batch.hi, time.perf_counter() - started, len(looked_up))
        if any(seq.num_drafts for seq in rows):
            rates = [
                seq.acceptance.rate_with(policy.pooled.rate(drafter.proposal_kind(seq)))
                if seq.num_drafts
                else 0.0
                for seq, drafter in zip(rows, batch.drafters)
            ]
            self._shorten_drafts(batch, rates)
        else:
            policy.choose(batch.hi, [], [], 0, False)  # nothing proposed (the usual pass on open chat)
        for seq in looked_up:
            backoff.planned(seq.planning, seq.num_drafts > 0)

    def _prepare_drafters(self, batch: _Batch) -> bool:
        """Each proposing drafter's preparation (a draft model's backlog): batched where it
        pays, then per row, guarded per row. A row its drafter is not ready for yet (a
        backlog longer than one pass's prefill budget) proposes nothing this pass. False
        when a row failed: the batch changed, and this pass is not run."""
        ok = True
        for drafter, group in batch.device_groups:
            if max(seq.num_drafts for seq in group):
                try:
                    drafter.prepare_rows(group)
                except Exception:  # noqa: BLE001 - then row by row below, a failing row failing alone
                    log.exception("batched_prepare_failed", rows=len(group))
                for seq in group:
                    self._guarded(seq, lambda seq=seq, drafter=drafter: drafter.prepare(seq))
                    ok = ok and not seq.finished
                    if not drafter.ready(seq):
                        seq.num_drafts = 0
        return ok

    def _while_device_runs(self, batch: _Batch) -> None:
        """Host work that needs no result of this pass, once its kernels are queued and
        before its synchronisation: the drafters' (a failure fails its row once the pass is
        over), then delivering the previous pass's tokens (a row that a stop string ends
        here gets its FinalResult once this pass is in its metrics)."""
        for seq, drafter in zip(batch.rows, batch.drafters):
            try:
                drafter.while_device_runs(seq)
            except Exception as exc:  # noqa: BLE001 - one request's host-side work
                self._failed_in_pass.append((seq, exc))
        self.output.flush(hold_finals=True)

    def flush(self) -> None:
        """Delivers the tokens of the last pass now (before a turn that admits requests,
        whose prefills would otherwise hold them back)."""
        self.output.flush()

    def _draft_and_verify(self, batch: _Batch) -> list[tuple[int, list[int]]] | None:
        """One pass: plan, draft, verify. Returns (a_s, the a_s + 1 emitted tokens) per row,
        or None when a row failed while its drafter prepared (no pass was run)."""
        self._plan(batch)
        if not self._prepare_drafters(batch):
            return None
        rows, hi = batch.rows, batch.hi
        n = max(seq.num_drafts for seq in rows)
        width = n + 1
        ctx = self._context(batch)

        # Everything the host knows goes to the device in one copy: every row's pending
        # token and host-side drafts ([hi, n + 1], zero padded), d_s per row, and a row mask
        # per drafter whose drafts are made on the device.
        values = [0] * (hi * width)
        starts = [0] * hi
        host_drafts: list[list[int] | None] = []  # per row; None: made on the device
        for seq in self._prefilling:  # a prefilling row in the span writes past what it has cached
            if seq.slot < hi:
                starts[seq.slot] = seq.target_len
        for seq, drafter in zip(rows, batch.drafters):
            at = seq.slot * width
            values[at] = seq.tokens[-1]
            starts[seq.slot] = seq.target_len
            d = seq.num_drafts
            if not d:
                host_drafts.append([])
            elif drafter.drafts_on_host:
                row_drafts = drafter.host_drafts(seq)
                assert len(row_drafts) == d, (
                    "a drafter returned other than d_s drafts"
                )  # would shift every later row
                values[at + 1 : at + 1 + d] = row_drafts
                host_drafts.append(row_drafts)
            else:
                host_drafts.append(None)
        sampled = not batch.sampling.all_greedy
        if sampled:  # d_s per row, for the rejection sampler
            values += [seq.num_drafts if seq is not None else 0 for seq in batch.by_slot]
        proposing = []  # (drafter, rows, m = the group's largest d_s)
        for drafter, group in batch.device_groups:
            group = [seq for seq in group if drafter.ready(seq)]
            m = max((seq.num_drafts for seq in group), default=0)
            if m:
                proposing.append((drafter, group, m))
                mask = [0] * hi
                for seq in group:
                    mask[seq.slot] = 1
                values += mask
        staged = self._staging.upload(values)
        input_ids = (staged if len(values) == hi * width else staged[: hi * width]).view(
            hi, width
        )  # [hi, n + 1]

        q_parts: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        masks_at = hi * (width + 1) if sampled else hi * width  # where the row masks start
        for i, (drafter, group, m) in enumerate(proposing):
            mask = staged[masks_at + i * hi : masks_at + (i + 1) * hi].bool()  # [hi]
            out = drafter.propose(ctx, group, m)
            input_ids[:, 1 : m + 1] = torch.where(mask[:, None], out.tokens, input_ids[:, 1 : m + 1])
            if out.probs is not None:
                q_parts.append((mask, m, out.probs))

        logits = self.target.forward(0, hi, input_ids, starts)  # [hi, n + 1, V]
        while_device_runs = functools.partial(self._while_device_runs, batch)

        if not sampled:
            verdicts = self._verify_greedy_on_host(rows, logits, input_ids, host_drafts, while_device_runs)
            self._staging.synchronized()
            return verdicts
        drafts = input_ids[:, 1:]  # [hi, n]
        num_drafts = staged[hi * width : hi * (width + 1)]  # [hi]
        p = probs_from_logits(logits, batch.sampling)  # [hi, n + 1, V]
        q = torch.nn.functional.one_hot(drafts, p.shape[-1]).float()  # [hi, n, V]
        for mask, m, probs in q_parts:
            q[:, :m] = torch.where(mask[:, None, None], probs, q[:, :m])
        q *= (torch.arange(n, device=self.device)[None, :] < num_drafts[:, None])[..., None]
        accepted, tokens = verify_rejection(p, q, drafts, num_drafts, ctx.u_accept[:, :n], ctx.u_bonus)
        # The pass's one device -> host transfer: accepted counts and emitted tokens together.
        verdict = torch.cat([accepted[:, None], tokens], dim=1)  # [hi, 1 + n + 1]
        while_device_runs()
        host = verdict.tolist()
        self._staging.synchronized()
        verdicts = []
        for seq in rows:
            a, *row_tokens = host[seq.slot]
            verdicts.append((a, row_tokens[: a + 1]))
        return verdicts

    @staticmethod
    def _verify_greedy_on_host(
        rows: list[Sequence],
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        host_drafts: list[list[int] | None],
        while_device_runs: Callable[[], None],
    ) -> list[tuple[int, list[int]]]:
        """Greedy verification (service.engine.speculation.verify.verify_greedy), compared on the host.

        Only the target's argmaxes cross to the host (with the input ids when some drafts
        were made on the device), in the pass's one device -> host transfer; the few
        comparisons per row cost less in Python than the kernels that would make them.
        """
        target = logits.argmax(dim=-1)  # [hi, n + 1]
        if all(d is not None for d in host_drafts):
            while_device_runs()
            host = target.tolist()  # [hi][n + 1]
            verdicts = []
            for seq, drafts in zip(rows, host_drafts):
                row = host[seq.slot]
                accepted = greedy_accepted(drafts, row) if drafts else 0
                verdicts.append((accepted, row[: accepted + 1]))
            return verdicts
        width = target.shape[1]
        both = torch.cat([input_ids, target], dim=1)  # [hi, 2 (n + 1)]: ids, then argmaxes
        while_device_runs()
        host = both.tolist()
        verdicts = []
        for seq, drafts in zip(rows, host_drafts):
            row = host[seq.slot]
            if drafts is None:
                drafts = row[1 : 1 + seq.num_drafts]
            accepted = greedy_accepted(drafts, row[width:]) if drafts else 0
            verdicts.append((accepted, row[width : width + accepted + 1]))
        return verdicts
