"""One decode pass over every decoding row: plan, draft, verify, accept (docs/engine.md).

Each row has its own length, drafts and verdict; the pass has one device synchronisation,
the device -> host copy of its verdicts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from service.engine.api import FinishReason, Method
from service.engine.batch_layout import BatchLayout, DecodeBatch
from service.engine.execution.runner import ModelRunner
from service.engine.execution.staging import UploadStaging
from service.engine.output import OutputProcessor
from service.engine.row_guard import RowGuard
from service.engine.sequence import Sequence
from service.engine.speculation.drafters import Drafter, DraftModelDrafter
from service.engine.speculation.planning import DraftPlanner
from service.engine.speculation.sampling import probs_from_logits
from service.engine.speculation.verify import greedy_accepted, verify_rejection

log = structlog.get_logger(__name__)

Verdicts = list[tuple[int, list[int]]]  # per row: (a_s, the a_s + 1 tokens the pass emits)


@dataclass
class PassTimes:
    """Host seconds of the last decode pass's phases (PassRecord's fields of the same names)."""

    plan_s: float = 0.0
    forward_s: float = 0.0
    verify_s: float = 0.0
    kv_bucket: int = 0
    verified_at: float = 0.0  # when the verdicts were on the host (0: the pass gave none)


class DecodePass:
    def __init__(
        self,
        target: ModelRunner,
        drafters: dict[Method, Drafter],
        output: OutputProcessor,
        layout: BatchLayout,
        planner: DraftPlanner,
        guard: RowGuard,
        staging: UploadStaging,
        measure_buckets: Callable[[], bool],
    ) -> None:
        self.target = target
        self.drafters = drafters
        self.output = output
        self.layout = layout
        self.planner = planner
        self.guard = guard
        self.device = target.device
        self._staging = staging
        self._measure_buckets = measure_buckets  # whether a pass observer wants PassTimes.kv_bucket
        self.times = PassTimes()
        self._runners = [target] + [d.runner for d in drafters.values() if isinstance(d, DraftModelDrafter)]
        self._failed_in_pass: list[tuple[Sequence, Exception]] = []  # (row, error) of the running pass

    def run(self, batch: DecodeBatch, prefilling: list[Sequence]) -> list[int] | None:
        """The pass over `batch`; rows that end are released. Returns the accepted drafts per
        row, or None when the pass gave no verdict (it failed, or a drafter's preparation
        failed a row and it was not run). `prefilling`: the rows still prefilling."""
        rows = batch.rows
        policy = self.planner.policy
        release = self.guard.release
        if policy is not None:
            started, captures = time.perf_counter(), self.captures()
        try:
            verdicts = self._draft_and_verify(batch, prefilling)
        except Exception as exc:  # noqa: BLE001 - a batched failure fails the batch, not the engine
            log.exception("decode_pass_failed", batch=len(rows))
            self._failed_in_pass.clear()
            self._release_staging()
            self.output.deliver_held()  # rows that ended in the flush: the pass gave no verdict
            for seq in rows:
                self.output.finish(
                    seq, FinishReason.ERROR, f"decode pass failed: {type(exc).__name__}: {exc}"
                )
                release(seq)
            return None
        if verdicts is None:  # a row failed before the pass; the others go on next step
            self.output.flush()
            for seq in rows:
                if seq.finished:
                    release(seq)
            return None
        drafts = max(seq.num_drafts for seq in rows)
        draft_model = self.planner.drafts_with_model(rows)
        # Rows that ended while this pass ran (a stop string or a failure found by the flush,
        # a drafter's failure): the pass counts in their metrics; its tokens are dropped.
        failed = {id(seq) for seq, _ in self._failed_in_pass}
        for seq, (accepted, _) in zip(rows, verdicts):
            if seq.finished or id(seq) in failed:
                try:  # one request's bookkeeping: a failure must not end the others
                    seq.stats.record_pass(seq.num_drafts, accepted)
                    self.output.cut(seq, accepted)
                except Exception:  # noqa: BLE001
                    log.exception("pass_bookkeeping_failed", request_id=seq.request_id)
        for seq, exc in self._failed_in_pass:
            self.guard.fail(seq, exc)
        self._failed_in_pass.clear()
        self.output.deliver_held()
        # Tokens this pass delivers: not those of rows that ended during the pass.
        emitted = sum(accepted + 1 for (accepted, _), seq in zip(verdicts, rows) if not seq.finished)
        for seq, drafter, (accepted, tokens) in zip(rows, batch.drafters, verdicts):
            if seq.finished:
                release(seq)
                continue
            self.planner.record(seq, drafter, accepted)
            try:  # one request's host-side work; an exception fails that request alone
                self._absorb(seq, drafter, accepted, tokens)
            except Exception as exc:  # noqa: BLE001
                self.guard.fail(seq, exc)
            if seq.finished:
                release(seq)
        if policy is not None:
            policy.pooled.end_pass()
            # The pass's cost is all of the engine thread's time for it; a pass that captured
            # a graph or fed a draft model a backlog is not a steady-state cost.
            if self.captures() == captures:
                policy.observe(batch.hi, drafts, draft_model, time.perf_counter() - started, emitted)
        return [accepted for accepted, _ in verdicts]

    def _absorb(self, seq: Sequence, drafter: Drafter, accepted: int, tokens: list[int]) -> None:
        seq.stats.record_pass(seq.num_drafts, accepted)
        try:
            self.planner.absorb(seq, accepted)
            drafter.commit(seq, accepted)
        except Exception:
            self.output.cut(seq, accepted)  # the pass is counted; its tokens never go out
            raise
        seq.target_len += accepted + 1  # the pending token and the accepted drafts are cached now
        # The first `accepted` tokens are the drafts, the last one the target's own;
        # delivered by the next pass's flush (or now, if it ends).
        self.output.accept(seq, tokens, accepted)

    def captures(self) -> int:
        """Graph captures plus draft-model catch-ups so far: passes that did one are not
        steady-state passes."""
        return sum(runner.captures for runner in self._runners) + sum(
            drafter.catch_ups for drafter in self.drafters.values()
        )

    def _release_staging(self) -> None:
        """After a failed pass: wait for the stream, so the pinned upload buffer is free again."""
        try:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self._staging.synchronized()
        except Exception:  # noqa: BLE001 - a broken device: later uploads take the safe path
            log.exception("staging_release_failed")

    def _prepare_drafters(self, batch: DecodeBatch) -> bool:
        """Each proposing drafter's preparation (a draft model's backlog): batched where it
        pays, then per row, guarded per row. A row its drafter is not ready for yet proposes
        nothing this pass. False when a row failed: the batch changed, and no pass is run."""
        ok = True
        for drafter, group in batch.device_groups:
            if max(seq.num_drafts for seq in group):
                try:
                    drafter.prepare_rows(group)
                except Exception:  # noqa: BLE001 - then row by row below, a failing row failing alone
                    log.exception("batched_prepare_failed", rows=len(group))
                for seq in group:
                    self.guard.run(seq, lambda seq=seq, drafter=drafter: drafter.prepare(seq))
                    if seq.finished:  # failed, and released: its drafter's state is gone
                        ok = False
                    elif not drafter.ready(seq):
                        seq.num_drafts = 0
        return ok

    def _while_device_runs(self, batch: DecodeBatch) -> None:
        """Host work that needs no result of this pass, between its launch and its
        synchronisation: the drafters' (a failure fails its row once the pass is over), then
        delivering the previous pass's tokens (a row a stop string ends here gets its
        FinalResult once this pass is in its metrics)."""
        for seq, drafter in zip(batch.rows, batch.drafters):
            try:
                drafter.while_device_runs(seq)
            except Exception as exc:  # noqa: BLE001 - one request's host-side work
                self._failed_in_pass.append((seq, exc))
        self.output.flush(hold_finals=True)
        self.output.delivered()

    def _draft_and_verify(self, batch: DecodeBatch, prefilling: list[Sequence]) -> Verdicts | None:
        """Plan, draft, verify. None when a row failed while its drafter prepared."""
        times = self.times
        times.forward_s = times.verify_s = times.verified_at = 0.0
        times.kv_bucket = 0
        t0 = time.perf_counter()
        self.planner.plan(batch)
        times.plan_s = time.perf_counter() - t0
        if not self._prepare_drafters(batch):
            return None
        rows, hi = batch.rows, batch.hi
        n = max(seq.num_drafts for seq in rows)
        width = n + 1
        ctx = self.layout.context(batch)

        # Everything the host knows goes to the device in one copy: every row's pending token
        # and host-side drafts ([hi, n + 1], zero padded), d_s per row, and a row mask per
        # drafter whose drafts are made on the device.
        values = [0] * (hi * width)
        starts = [0] * hi
        host_drafts: list[list[int] | None] = []  # per row; None: made on the device
        for seq in prefilling:  # a prefilling row in the span writes past what it has cached
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
                )  # would shift later rows
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

        t0 = time.perf_counter()
        logits = self.target.forward(0, hi, input_ids, starts)  # [hi, n + 1, V]
        t1 = time.perf_counter()
        times.forward_s = t1 - t0
        if self._measure_buckets():
            graphs = self.target.graphs
            times.kv_bucket = graphs.buckets(hi, width, max(starts))[2] if graphs is not None else 0
        while_device_runs = functools.partial(self._while_device_runs, batch)

        if not sampled:
            verdicts = verify_greedy_on_host(rows, logits, input_ids, host_drafts, while_device_runs)
            self._staging.synchronized()
            times.verified_at = time.perf_counter()
            times.verify_s = times.verified_at - t1
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
        times.verified_at = time.perf_counter()
        times.verify_s = times.verified_at - t1
        return verdicts


def verify_greedy_on_host(
    rows: list[Sequence],
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    host_drafts: list[list[int] | None],
    while_device_runs: Callable[[], None],
) -> Verdicts:
    """Greedy verification with the comparisons on the host (the same rule as the device's,
    tests/engine/test_verify.py). Only the target's argmaxes cross to the host (with the
    input ids when some drafts were made on the device), in the pass's one transfer: a few
    comparisons per row cost less in Python than the kernels that would make them."""
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
