"""Continuous batching: slots, admission (prefill), decode passes, release.

Runs on the engine thread only. Each running request owns one slot (a row of every KV
cache); a decode pass runs all of them together, each row with its own length, drafts and
verdict. Requests join (after their own prefill) and leave between passes.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable

import structlog
import torch

from service.engine.adaptive import DraftLengthPolicy
from service.engine.api import FinishReason, Method
from service.engine.device import to_device
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.drafters import Drafter, DraftModelDrafter, PassContext
from service.engine.output import OutputProcessor
from service.engine.runner import ModelRunner
from service.engine.sampling import GREEDY, BatchSampling, probs_from_logits, sample_from
from service.engine.sequence import Sequence
from service.engine.verify import verify_greedy, verify_rejection

log = structlog.get_logger(__name__)


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
    ) -> None:
        self.target = target
        self.drafters = drafters
        self.output = output
        self.tokenizer = tokenizer
        self.max_k = max_k
        self.max_context = max_context
        self.device = target.device
        self.policy = policy
        self.running: dict[int, Sequence] = {}
        self._free = list(range(max_batch))  # a min-heap: low slots first keeps batches dense

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _release(self, seq: Sequence) -> None:
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)

    def _guarded(self, seq: Sequence, work: Callable[[], None]) -> None:
        """Runs one request's host-side work; an exception fails that request alone."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001
            log.exception("request_failed", request_id=seq.request_id)
            self.output.finish(seq, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
        if seq.finished:
            self._release(seq)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        for seq in list(self.running.values()):
            self.output.finish(seq, reason, error)
            self._release(seq)

    def cancel_flagged(self) -> None:
        for seq in list(self.running.values()):
            if seq.handle.cancelled:
                self.output.finish(seq, FinishReason.CANCELLED)
                self._release(seq)

    # ---- admission -------------------------------------------------------------------

    def admit(self, seq: Sequence) -> None:
        """Takes a free slot, prefills the prompt (target and drafter) and emits token 1."""
        seq.slot = heapq.heappop(self._free)
        self.running[seq.slot] = seq
        seq.timing.admitted = time.monotonic()
        first: list[int] = []

        def prefill() -> None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.seed)
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.tokens, seq.request.stop)
            prompt = to_device([seq.tokens], torch.long, self.device)  # [1, P]
            logits = self.target.forward(seq.slot, seq.slot + 1, prompt, [0], last_only=True)  # [1, 1, V]
            seq.target_len = seq.prompt_len
            if seq.sampling.greedy:
                token = logits[0, 0].argmax()
            else:
                probs = probs_from_logits(logits, BatchSampling.build([seq.sampling], self.device))  # [1, 1, V]
                u = torch.rand(1, generator=seq.generator, device=self.device)  # [1]
                token = sample_from(probs[:, 0], u)[0]
            self.drafters[seq.method].start(seq)
            first.append(int(token.item()))  # the prefill's one device -> host transfer

        self._guarded(seq, prefill)
        if not seq.finished:
            self._guarded(seq, lambda: self.output.emit(seq, first))

    # ---- one decode pass -------------------------------------------------------------

    def _uniforms(self, by_slot: dict[int, Sequence], hi: int, all_greedy: bool) -> torch.Tensor:
        """[hi, 2K + 1]: each sampling row draws a fixed number from its own generator per
        pass, so its random stream does not depend on the batch it runs in."""
        width = 2 * self.max_k + 1
        if all_greedy:
            return torch.zeros((hi, width), device=self.device)
        zeros = torch.zeros(width, device=self.device)
        rows = []
        for slot in range(hi):
            seq = by_slot.get(slot)
            if seq is None or seq.sampling.greedy:
                rows.append(zeros)
            else:
                rows.append(torch.rand(width, generator=seq.generator, device=self.device))
        return torch.stack(rows)

    def step(self) -> None:
        """One decode pass over every running request: draft, verify, accept, emit."""
        rows = [self.running[s] for s in sorted(self.running)]
        if not rows:
            return
        started, captures = time.perf_counter(), self._captures()
        try:
            verdicts = self._draft_and_verify(rows)
        except Exception as exc:  # noqa: BLE001 - a batched failure fails the batch, not the engine
            log.exception("decode_pass_failed", batch=len(rows))
            for seq in rows:
                self.output.finish(seq, FinishReason.ERROR, f"decode pass failed: {type(exc).__name__}: {exc}")
                self._release(seq)
            return
        # The verdicts are on the host: the pass is over. A pass that captured a new graph
        # (and compiled its kernels) says nothing about the steady-state cost.
        if self.policy is not None and self._captures() == captures:
            drafts = max(seq.num_drafts for seq in rows)
            self.policy.observe(rows[-1].slot + 1, drafts, self._drafts_with_model(rows), time.perf_counter() - started)
        for seq in rows:
            accepted, tokens = verdicts[seq.slot][0], verdicts[seq.slot][1:]
            self._guarded(seq, lambda seq=seq, a=accepted, t=tokens: self._absorb(seq, a, t[: a + 1]))

    def _absorb(self, seq: Sequence, accepted: int, tokens: list[int]) -> None:
        seq.stats.record_pass(seq.num_drafts, accepted)
        seq.acceptance.update(seq.num_drafts, accepted)
        self.drafters[seq.method].commit(seq, accepted)
        seq.target_len += accepted + 1  # the pending token and the accepted drafts are cached now
        self.output.emit(seq, tokens)

    @staticmethod
    def _drafts_with_model(rows: list[Sequence]) -> bool:
        """Whether the draft model runs this pass (it runs only for rows that draft)."""
        return any(seq.method is Method.DRAFT_MODEL and seq.num_drafts > 0 for seq in rows)

    def _captures(self) -> int:
        runners = [self.target] + [d.runner for d in self.drafters.values() if isinstance(d, DraftModelDrafter)]
        return sum(runner.captures for runner in runners)

    @staticmethod
    def _adapts(seq: Sequence) -> bool:
        """Whether the adaptive policy may shorten this row's drafts. Seeded sampled rows keep
        theirs: their random stream, and so their output, must not depend on timings."""
        return seq.sampling.greedy or seq.request.sampling.seed is None

    def _shorten_drafts(self, rows: list[Sequence], hi: int) -> None:
        """Caps d_s by the adaptive policy."""
        fixed = [seq.num_drafts for seq in rows if not self._adapts(seq)]
        cap = self.policy.choose(
            hi, [seq.num_drafts for seq in rows], [seq.acceptance.rate for seq in rows], max(fixed, default=0),
            self._drafts_with_model(rows))
        for seq in rows:
            if self._adapts(seq):
                seq.num_drafts = min(seq.num_drafts, cap)

    def _drafting_cannot_pay(self, rows: list[Sequence], hi: int, limits: dict[int, int]) -> bool:
        """True when plain decoding beats drafting even if every row proposed its whole limit:
        then the drafters need not plan at all (an n-gram lookup per row per pass is host time
        comparable to a batch-32 pass)."""
        if any(limits[seq.slot] and not self._adapts(seq) for seq in rows):
            return False
        draft_model = any(seq.method is Method.DRAFT_MODEL and limits[seq.slot] for seq in rows)
        best = self.policy.best_cap(hi, [limits[seq.slot] for seq in rows], [seq.acceptance.rate for seq in rows],
                                    0, draft_model)
        return best == 0

    def _draft_and_verify(self, rows: list[Sequence]) -> list[list[int]]:
        hi = rows[-1].slot + 1
        by_slot = {seq.slot: seq for seq in rows}
        limits = {}
        for seq in rows:
            remaining = seq.max_tokens - seq.completion_tokens  # a pass emits up to d_s + 1 tokens
            room = self.max_context - len(seq.tokens)
            limits[seq.slot] = max(0, min(seq.k, remaining - 1, room - 1))
        skip_planning = self.policy is not None and self._drafting_cannot_pay(rows, hi, limits)
        for seq in rows:
            seq.num_drafts = 0 if skip_planning else self.drafters[seq.method].plan(seq, limits[seq.slot])
        if self.policy is not None:
            self._shorten_drafts(rows, hi)
        n = max(seq.num_drafts for seq in rows)
        sampling = BatchSampling.build([by_slot[s].sampling if s in by_slot else GREEDY for s in range(hi)], self.device)
        u = self._uniforms(by_slot, hi, sampling.all_greedy)  # [hi, 2K + 1]
        k = self.max_k
        ctx = PassContext(hi, self.device, sampling, u[:, :k], u[:, k : 2 * k], u[:, 2 * k])

        drafts = torch.zeros((hi, n), dtype=torch.long, device=self.device)  # [hi, n]
        q_parts: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        for method, drafter in self.drafters.items():
            group = [seq for seq in rows if seq.method is method and seq.k > 0]
            m = max((seq.num_drafts for seq in group), default=0)
            if m == 0:
                continue
            out = drafter.propose(ctx, group, m)
            slots = {seq.slot for seq in group}
            mask = to_device([s in slots for s in range(hi)], torch.bool, self.device)  # [hi]
            drafts[:, :m] = torch.where(mask[:, None], out.tokens, drafts[:, :m])
            if out.probs is not None:
                q_parts.append((mask, m, out.probs))

        num_drafts = to_device([by_slot[s].num_drafts if s in by_slot else 0 for s in range(hi)], torch.long, self.device)
        pending = [by_slot[s].tokens[-1] if s in by_slot else 0 for s in range(hi)]
        input_ids = torch.cat([to_device(pending, torch.long, self.device)[:, None], drafts], dim=1)  # [hi, n + 1]
        starts = [by_slot[s].target_len if s in by_slot else 0 for s in range(hi)]
        logits = self.target.forward(0, hi, input_ids, starts)  # [hi, n + 1, V]

        if sampling.all_greedy:
            accepted, tokens = verify_greedy(logits, drafts, num_drafts)
        else:
            p = probs_from_logits(logits, sampling)  # [hi, n + 1, V]
            q = torch.nn.functional.one_hot(drafts, p.shape[-1]).float()  # [hi, n, V]
            for mask, m, probs in q_parts:
                q[:, :m] = torch.where(mask[:, None, None], probs, q[:, :m])
            q *= (torch.arange(n, device=self.device)[None, :] < num_drafts[:, None])[..., None]
            accepted, tokens = verify_rejection(p, q, drafts, num_drafts, ctx.u_accept[:, :n], ctx.u_bonus)
        # The pass's one device -> host transfer: accepted counts and emitted tokens together.
        return torch.cat([accepted[:, None], tokens], dim=1).tolist()  # [hi][1 + n + 1]
