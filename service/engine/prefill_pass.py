"""One prefill pass: the next prompt tokens of the rows still prefilling (docs/prefill.md)."""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch

from service.engine.api import FinishReason
from service.engine.execution.device import to_device
from service.engine.execution.runner import ModelRunner
from service.engine.output import OutputProcessor
from service.engine.prefill import allocate, forward_groups
from service.engine.row_guard import RowGuard
from service.engine.sequence import Sequence
from service.engine.speculation.sampling import BatchSampling, probs_from_logits, sample_from

log = structlog.get_logger(__name__)


class PrefillPass:
    def __init__(
        self,
        target: ModelRunner,
        output: OutputProcessor,
        guard: RowGuard,
        budget: int,
        while_device_runs: Callable[[list[Sequence]], None] = lambda rows: None,
    ) -> None:
        if budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, not {budget}")
        self.target = target
        self.output = output
        self.guard = guard
        self.budget = budget  # prompt tokens a prefill pass feeds at most
        # Host work for the pass's rows between the launch and the one transfer (the
        # drafters'); it guards its rows itself.
        self.while_device_runs = while_device_runs
        self.device = target.device

    def run(self, rows: list[Sequence], running: dict[int, Sequence]) -> list[tuple[Sequence, int]]:
        """Feeds `rows`' next prompt tokens, at most `budget` of them (prefill.allocate), in
        one forward per group of nearby slots, padded to the group's longest chunk. Returns
        (row, its first generated token) for each row whose prompt is now all cached (all
        such tokens cross to the host in one transfer). A forward that fails fails its rows.
        `running`: every admitted row by slot (rows that end are released from it)."""
        chunks = allocate([seq.prompt_len - seq.target_len for seq in rows], self.budget)
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
                other = running.get(lo + r)
                if other is not None:
                    starts[r] = other.target_len
            for slot in group:
                seq, chunk = running[slot], chunk_of[slot]
                ids[slot - lo][:chunk] = seq.tokens[seq.target_len : seq.target_len + chunk]
                lengths[slot - lo] = chunk
            try:
                logits = self.target.forward(
                    lo, hi, to_device(ids, torch.long, self.device), starts, last_only=True, lengths=lengths
                )  # [hi - lo, 1, V]
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its rows, not the engine
                log.exception("prefill_pass_failed", rows=len(group))
                for slot in group:
                    seq = running[slot]
                    self.output.finish(
                        seq, FinishReason.ERROR, f"prefill failed: {type(exc).__name__}: {exc}"
                    )
                    self.guard.release(seq)
                continue
            for slot in group:
                seq = running[slot]
                seq.target_len += chunk_of[slot]
                if seq.target_len == seq.prompt_len:
                    completed.append((seq, logits[slot - lo]))
        first: list[tuple[Sequence, torch.Tensor]] = []
        for seq, row_logits in completed:
            self.guard.run(
                seq,
                lambda seq=seq, row_logits=row_logits: first.append(
                    (seq, self._first_token(seq, row_logits))
                ),
            )
        # While the device runs the prefill: the drafters' work for these rows, and the last
        # decode pass's tokens, as a decode pass does.
        self.while_device_runs(rows)
        self.output.flush()
        for seq in list(running.values()):
            if seq.finished:
                self.guard.release(seq)
        first = [(seq, token) for seq, token in first if not seq.finished]
        if not first:
            return []
        tokens = torch.stack([token for _, token in first]).tolist()  # the pass's one device -> host transfer
        return [(seq, token) for (seq, _), token in zip(first, tokens)]

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from its last token's logits [1, V] (a 0-dim device tensor)."""
        if seq.sampling.greedy:
            return logits[0].argmax()
        probs = probs_from_logits(logits[None], BatchSampling.build([seq.sampling], self.device))  # [1, 1, V]
        u = torch.rand(1, generator=seq.generator, device=self.device)  # [1]
        return sample_from(probs[:, 0], u)[0]
