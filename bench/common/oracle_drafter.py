"""A benchmark-only drafter: the draft model's real passes, the target's own greedy tokens.

No real draft model lets a benchmark choose its acceptance rate, and a random-weight draft
model (bench/random_model.py) is never accepted. `OracleDrafter` runs the draft model's
passes exactly as `DraftModelDrafter` does (the same catch-ups, forwards, shapes and cache
bookkeeping: that is the price of drafting) and then replaces what the draft model proposed
by the target's known greedy continuation of the request, each token independently
replaced by a wrong one with probability 1 - alpha. A greedy verifier accepts a draft iff it
is the target's argmax, so every draft is accepted with probability alpha given that the ones
before it were: the i.i.d. model of the draft-length policy and of bench/gpu_pass_cost.py's
predicted speedup, with alpha chosen. It is handed to the engine through
`Engine(draft_model_drafter=...)`; the service never builds it.

Why the continuation of a plain run is the speculative run's too. Greedy decoding is a
function of the logits, and the engine computes a token's logits with the same bits in a
verify pass as in a plain pass: on the CPU in float32 rows never mix, on CUDA the invariant
kernels give a row the same bits in every pass on one side of the model's gemv limit
(docs/engine.md, "Execution paths": 16 rows for small models, 0 at the 8B shape, where every
pass runs on one kernel). So a request's greedy output is the same with and without
speculation as long as its passes stay on one side of the limit and its prompt was prefilled
the same way. Where that fails (a prefill grouped differently in bfloat16, a batch that
shrinks across the limit as requests end, a near-tie) the outputs part, and from there on the
oracle proposes tokens of another text, accepted only by chance.
`GreedyOracle.first_divergence` finds such rows after the run, and the drafter counts rows
whose pending token left the oracle while running (`diverged`): a benchmark reports both,
never hides them (bench.draft_speedup also re-records the continuation from an untimed
speculative run, whose passes have the timed runs' shapes, and reports how many rows that
changed).

Which positions are corrupted is a function of (seed, prompt, position) only, drawn once per
prompt (a uniform and a wrong token per position) and compared with alpha: the same text
difficulty for every k, policy and run, and the corrupted sets nested across alphas. Each
position is examined by the verifier at most once (an accepted draft is never proposed again;
at a rejected one the target's own token follows, and the next pass starts after it), so the
verdicts are independent Bernoulli(alpha) trials and the accepted length of a pass of d
drafts is truncated-geometric: P(a = j) = alpha^j (1 - alpha) for j < d, alpha^d for j = d.

One synchronisation per pass (docs/engine.md): the replacement is built on the host from
known data and queued to the device in one pinned copy (`to_device`), like the draft model's
own inputs; nothing is read back from the device.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch

from service.engine.execution.device import to_device
from service.engine.execution.runner import ModelRunner
from service.engine.sequence import Sequence
from service.engine.speculation.drafters import DraftModelDrafter, DraftOutput, PassContext


class GreedyOracle:
    """The target's greedy continuation of each prompt, recorded from a plain greedy run."""

    def __init__(self) -> None:
        self._continuations: dict[tuple[int, ...], list[int]] = {}

    def record(self, prompt: tuple[int, ...] | list[int], tokens: list[int]) -> None:
        """The generated tokens (the prefill's first, then every decode pass's) of a plain
        greedy request for `prompt`; a later record of the same prompt replaces it (a run at
        another batch size, whose kernels may round differently)."""
        self._continuations[tuple(prompt)] = list(tokens)

    def continuation(self, prompt: tuple[int, ...] | list[int]) -> list[int] | None:
        return self._continuations.get(tuple(prompt))

    def first_divergence(self, prompt: tuple[int, ...] | list[int], tokens: list[int]) -> int | None:
        """The first generated position where `tokens` leaves the recorded continuation
        (a token past the shorter of the two counts), None where they agree."""
        known = self._continuations[tuple(prompt)]
        for i, (a, b) in enumerate(zip(known, tokens)):
            if a != b:
                return i
        return None if len(known) == len(tokens) else min(len(known), len(tokens))


@dataclass
class _OracleRow:
    """A drafting row's continuation and its corruption draws, by generated position."""

    continuation: list[int]
    uniforms: list[float]  # position j is corrupted iff uniforms[j] >= alpha
    wrong: list[int]  # the token proposed at a corrupted position (never the right one)


class OracleDrafter(DraftModelDrafter):
    """DraftModelDrafter's passes with the oracle's tokens (greedy requests only).

    `alpha` (the per-token agreement) may be changed between runs, while no request drafts.
    """

    def __init__(
        self,
        runner: ModelRunner,
        catch_up_budget: int,
        oracle: GreedyOracle,
        alpha: float,
        seed: int = 0,
    ) -> None:
        super().__init__(runner, catch_up_budget)
        self.oracle = oracle
        self.alpha = alpha
        self.seed = seed
        self._oracle_rows: dict[int, _OracleRow] = {}  # by slot
        self._draws: dict[tuple[int, ...], tuple[list[float], list[int]]] = {}  # by prompt
        self.diverged: set[str] = set()  # request ids whose pending token left the oracle

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {value!r}")
        self._alpha = float(value)

    def draws(self, prompt: tuple[int, ...], length: int) -> tuple[list[float], list[int]]:
        """(uniform, wrong-token offset) per position, from (seed, prompt) alone."""
        draws = self._draws.get(prompt)
        if draws is None or len(draws[0]) < length:
            digest = zlib.crc32(repr(prompt).encode())
            rng = random.Random(f"{self.seed}:{digest}:{len(prompt)}")
            uniforms, offsets = [], []
            for _ in range(length):
                uniforms.append(rng.random())
                offsets.append(rng.randrange(1, self.runner.vocab_size))
            draws = self._draws[prompt] = (uniforms, offsets)
        return draws

    def start(self, seq: Sequence) -> None:
        if not seq.sampling.greedy:
            raise ValueError(
                f"request {seq.request_id!r}: the oracle drafter proposes the target's greedy "
                f"continuation, so it serves greedy requests only (temperature 0), not "
                f"temperature {seq.sampling.temperature}"
            )
        prompt = tuple(seq.tokens[: seq.prompt_len])
        continuation = self.oracle.continuation(prompt)
        if continuation is None:
            raise LookupError(
                f"request {seq.request_id!r}: no greedy continuation recorded for its prompt "
                f"({seq.prompt_len} tokens); run the prompt plain first (GreedyOracle.record)"
            )
        uniforms, offsets = self.draws(prompt, len(continuation))
        vocab = self.runner.vocab_size
        wrong = [(token + offset) % vocab for token, offset in zip(continuation, offsets)]
        self._oracle_rows[seq.slot] = _OracleRow(continuation, uniforms, wrong)
        super().start(seq)

    def plan(self, seq: Sequence, limit: int) -> int:
        # Nothing past the continuation's end: after an end-of-sequence token the target's
        # next argmax is unknown (a request that ran to its max_tokens has limit below it).
        known = len(self._oracle_rows[seq.slot].continuation) - (len(seq.tokens) - seq.prompt_len)
        return max(0, min(limit, known))

    def release(self, seq: Sequence) -> None:
        self._oracle_rows.pop(seq.slot, None)
        super().release(seq)

    def propose(self, ctx: PassContext, rows: list[Sequence], n: int) -> DraftOutput:
        if not all(seq.sampling.greedy for seq in rows):  # start() refused them; never reached
            raise ValueError("the oracle drafter serves greedy requests only")
        real = super().propose(ctx, rows, n)  # the draft model's passes: the price
        alpha = self._alpha
        ids = [[0] * n for _ in range(ctx.hi)]  # [hi, n]
        for seq in rows:
            row = self._oracle_rows[seq.slot]
            known = row.continuation
            at = len(seq.tokens) - seq.prompt_len  # generated so far, the pending token included
            if at - 1 >= len(known) or known[at - 1] != seq.tokens[-1]:
                self.diverged.add(seq.request_id)
            drafts = ids[seq.slot]
            for i in range(n):
                j = at + i
                if j < len(known):  # plan() proposes no further
                    drafts[i] = known[j] if row.uniforms[j] < alpha else row.wrong[j]
        return DraftOutput(to_device(ids, torch.long, real.tokens.device), None)
