"""Continuous batching: slots, admission, the order of passes, release.

Runs on the engine thread only. Each running request owns one slot (a row of every KV
cache). An admitted request first prefills: every step runs one prefill pass over the rows
still prefilling (prefill_pass.py), then one decode pass over the rows decoding
(decode_pass.py). A row joins the decode passes once its prompt is in the cache; requests
leave between passes.
"""

from __future__ import annotations

import heapq
import time

import torch

from service.engine.api import FinishReason, Method
from service.engine.batch_layout import BatchLayout
from service.engine.decode_pass import DecodePass
from service.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from service.engine.execution.runner import ModelRunner
from service.engine.execution.staging import UploadStaging
from service.engine.output import OutputProcessor
from service.engine.pass_record import PassObserver, PassRecord, notify
from service.engine.prefill_pass import PrefillPass
from service.engine.row_guard import RowGuard
from service.engine.sequence import Sequence
from service.engine.speculation.draft_length_policy import DraftLengthPolicy
from service.engine.speculation.drafters import Drafter
from service.engine.speculation.planning import DraftPlanner


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
        observers: list[PassObserver] | None = None,
    ) -> None:
        self.drafters = drafters
        self.output = output
        self.tokenizer = tokenizer
        self.device = target.device
        self.observers = observers if observers is not None else []  # called after every step
        self.running: dict[int, Sequence] = {}  # by slot: every admitted request, prefilling or decoding
        self._prefilling: list[Sequence] = []  # rows whose prompt is not all cached yet, by admission
        self._free = list(range(max_batch))  # a min-heap: low slots first keeps batches dense
        self._admitted = 0  # admissions since the last step
        self._texts = TokenTexts(tokenizer)  # decoding shared by every request's detokenizer
        self._guard = RowGuard(output, self._release)
        self._prefill = PrefillPass(target, output, self._guard, prefill_budget, self._while_prefill_runs)
        self._layout = BatchLayout(drafters, max_k, self.device)
        self._planner = DraftPlanner(drafters, max_context, policy)
        # ids [B, K + 1], then d_s [B], then one row mask [B] per device drafter
        staging = UploadStaging(self.device, max_batch * (max_k + 2 + len(drafters)))
        self._decode = DecodePass(
            target, drafters, output, self._layout, self._planner, self._guard, staging, self._observed
        )

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def prefilling(self) -> int:
        """Admitted requests whose prompt is not all prefilled yet."""
        return len(self._prefilling)

    def _observed(self) -> bool:
        return bool(self.observers)

    def _release(self, seq: Sequence) -> None:
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            self.drafters[seq.method].release(seq)
            self._planner.release(seq)
            if seq.decoding:
                self._layout.invalidate()
            else:
                self._prefilling.remove(seq)

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

    def admit(self, seq: Sequence) -> None:
        """Takes a free slot; the prompt is prefilled by the coming steps' prefill passes."""
        seq.slot = heapq.heappop(self._free)
        self.running[seq.slot] = seq
        seq.timing.admitted = time.monotonic()
        self._admitted += 1

        def start() -> None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.seed)
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.tokens, seq.request.stop, self._texts)
            self.drafters[seq.method].start(seq)

        self._prefilling.append(seq)
        self._guard.run(seq, start)

    def flush(self) -> None:
        """Delivers the tokens of the last pass now (before a turn that admits requests,
        whose prefills would otherwise hold them back)."""
        self.output.flush()
        self.output.delivered()

    def _while_prefill_runs(self, rows: list[Sequence]) -> None:
        """The drafters' host work for the rows of a prefill pass, while the device runs it
        (an n-gram index takes in the prompt here, not on the first decode pass's critical
        path); a failure fails its row alone."""
        for seq in rows:
            if not seq.finished:
                self._guard.run(seq, lambda seq=seq: self.drafters[seq.method].while_device_runs(seq))

    def _join_decoding(self, seq: Sequence, first_token: int) -> None:
        """The row's prompt is cached and its first token sampled: it joins the decode passes."""
        self._prefilling.remove(seq)
        seq.decoding = True
        self._layout.invalidate()
        self._guard.run(seq, lambda: self.output.emit(seq, [first_token]))

    def step(self) -> None:
        """One prefill pass over the rows prefilling, then one decode pass over every row
        decoding: draft, verify, accept, emit."""
        admitted, self._admitted = self._admitted, 0
        observed = bool(self.observers)
        if observed:
            started, captures = time.perf_counter(), self._decode.captures()
        prefill_rows = len(self._prefilling)
        if prefill_rows:
            for seq, token in self._prefill.run(list(self._prefilling), self.running):
                self._join_decoding(seq, token)
            self.output.delivered()  # first tokens go out before the decode pass
        if len(self.running) == len(self._prefilling):
            if observed:
                self._observe(started, captures, admitted, prefill_rows, None, None)
            return
        if observed:
            prefilled = time.perf_counter()
        batch = self._layout.current(self.running)
        accepted = self._decode.run(batch, self._prefilling)
        if observed:
            self._observe(
                started, captures, admitted, prefill_rows, (prefilled, batch.rows, batch.hi), accepted
            )

    def _observe(
        self,
        started: float,
        captures: int,
        admitted: int,
        prefill_rows: int,
        decode: tuple[float, list[Sequence], int] | None,
        accepted: list[int] | None,
    ) -> None:
        ended = time.perf_counter()
        steady = self._decode.captures() == captures
        if decode is None:
            record = PassRecord(admitted, prefill_rows, steady, ended - started, ended - started)
        else:
            prefilled, rows, hi = decode
            times = self._decode.times
            proposed = tuple(seq.num_drafts for seq in rows)
            record = PassRecord(
                admitted=admitted,
                prefill_rows=prefill_rows,
                steady=steady,
                total_s=ended - started,
                prefill_s=prefilled - started,
                rows=len(rows),
                span=hi,
                methods=tuple(seq.method for seq in rows),
                proposed=proposed,
                accepted=tuple(accepted) if accepted is not None else (),
                drafts=max(proposed),
                draft_model=DraftPlanner.drafts_with_model(rows),
                kv_bucket=times.kv_bucket,
                plan_s=times.plan_s,
                forward_s=times.forward_s,
                verify_s=times.verify_s,
                absorb_s=ended - times.verified_at if times.verified_at else 0.0,
            )
        notify(self.observers, record)
