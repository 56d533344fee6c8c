"""A decode pass's batch layout: the decoding rows by slot, their sampling and drafters, and
each pass's uniforms. Rebuilt only when a request joins or leaves the decode passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.api import Method
from service.engine.sequence import Sequence
from service.engine.speculation.drafters import Drafter, PassContext
from service.engine.speculation.planning import DraftPlanner
from service.engine.speculation.sampling import GREEDY, BatchSampling


@dataclass
class DecodeBatch:
    """What a decode pass needs to know about the decoding rows that changes only when a
    request joins or leaves."""

    rows: list[Sequence]  # by slot
    drafters: list[Drafter]  # rows[i]'s drafter
    hi: int  # rows occupy slots [0, hi)
    by_slot: list[Sequence | None]  # [hi]
    sampling: BatchSampling  # [hi] rows; free slots are greedy dummies
    greedy_context: PassContext | None  # the all-greedy pass context (no uniforms to draw)
    can_draft: bool  # some row has k > 0
    adapts: list[bool]  # per row: the policy may shorten its drafts (DraftPlanner.adapts)
    # Per row: its lookups are host work the planning backoff may skip (it drafts, adapts, and
    # its drafter plans on the host).
    backs_off: list[bool]
    backoff_rows: int  # how many rows back off (the planning backoff's measure of a pass's lookups)
    # Rows (k > 0) of drafters whose drafts exist only on the device, by drafter.
    device_groups: list[tuple[Drafter, list[Sequence]]]


class BatchLayout:
    def __init__(self, drafters: dict[Method, Drafter], max_k: int, device: torch.device) -> None:
        self.drafters = drafters
        self.max_k = max_k
        self.device = device
        self._batch: DecodeBatch | None = None  # None: rebuild at the next pass

    def invalidate(self) -> None:
        """A row joined or left the decode passes."""
        self._batch = None

    def current(self, running: dict[int, Sequence]) -> DecodeBatch:
        """The layout of the decoding rows among `running` (by slot; at least one decodes)."""
        if self._batch is None:
            self._batch = self._build(running)
        return self._batch

    def _build(self, running: dict[int, Sequence]) -> DecodeBatch:
        rows = [running[s] for s in sorted(running) if running[s].decoding]
        hi = rows[-1].slot + 1
        by_slot: list[Sequence | None] = [None] * hi
        for seq in rows:
            by_slot[seq.slot] = seq
        sampling = BatchSampling.build(
            [seq.sampling if seq is not None else GREEDY for seq in by_slot], self.device
        )
        greedy_context = None
        if sampling.all_greedy:
            greedy_context = self._pass_context(hi, sampling, by_slot, self.uniforms(by_slot, hi, True))
        device_groups = []
        for method, drafter in self.drafters.items():
            group = [seq for seq in rows if seq.method is method and seq.k > 0]
            if group and not drafter.drafts_on_host:
                device_groups.append((drafter, group))
        adapts = [DraftPlanner.adapts(seq) for seq in rows]
        backs_off = [
            a and seq.k > 0 and self.drafters[seq.method].drafts_on_host for seq, a in zip(rows, adapts)
        ]
        return DecodeBatch(
            rows=rows,
            drafters=[self.drafters[seq.method] for seq in rows],
            hi=hi,
            by_slot=by_slot,
            sampling=sampling,
            greedy_context=greedy_context,
            can_draft=any(seq.k > 0 for seq in rows),
            adapts=adapts,
            backs_off=backs_off,
            backoff_rows=sum(backs_off),
            device_groups=device_groups,
        )

    def uniforms(self, by_slot: list[Sequence | None], hi: int, all_greedy: bool) -> torch.Tensor:
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

    def context(self, batch: DecodeBatch) -> PassContext:
        """The pass's context: fresh uniforms unless every row is greedy."""
        if batch.greedy_context is not None:
            return batch.greedy_context
        u = self.uniforms(batch.by_slot, batch.hi, False)  # [hi, 2K + 1]
        return self._pass_context(batch.hi, batch.sampling, batch.by_slot, u)

    def _pass_context(
        self, hi: int, sampling: BatchSampling, by_slot: list[Sequence | None], u: torch.Tensor
    ) -> PassContext:
        k = self.max_k
        return PassContext(hi, self.device, sampling, u[:, :k], u[:, k : 2 * k], u[:, 2 * k], by_slot)
