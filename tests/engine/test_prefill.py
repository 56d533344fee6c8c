"""Batched and chunked prefill (docs/prefill.md): prompts prefilled together and in chunks
under a per-pass token budget, between decode passes, give each request the output it gets
alone; the budget bounds every prefill pass; a cancelled prefill stops within one chunk.

Prompt tokens are never id 0 (the tokenizer's EOS, which encoded text does not contain),
and the scheduler pads with 0: the nonzero ids of a prefill forward are its prompt tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch

from service.engine import FinishReason, GenerationRequest, Method
from service.engine.execution.runner import ModelRunner
from service.engine.prefill import allocate, forward_groups
from tests.engine.helpers import assert_same_cache, run, submit, wait_checked
from tests.support.float_compare import FORWARD_BUDGET, assert_close_up_to_rounding, rounding_bound

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps. The fox runs away. " * 2,
    "def add(x, y):\n",
    "Speculative decoding drafts tokens and verifies them with the target model.",
    "Hi",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🙂🚀✨. " * 2,
    "print(add(1, 2))\n" * 3,
]


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    assert 0 not in ids
    return ids


@dataclass
class Forwards:
    """The forwards of one model's runner, in order: ("P", prompt tokens fed) for a prefill or
    catch-up (last_only), ("D", rows) for a decode or draft pass."""

    model_name: str
    calls: list[tuple[str, int]] = field(default_factory=list)
    after_prefill: object = None  # called (with the forward's ids) after each prefill forward

    def install(self, monkeypatch) -> None:
        original = ModelRunner.forward

        def spy(runner, lo, hi, input_ids, starts, last_only=False, **kwargs):
            out = original(runner, lo, hi, input_ids, starts, last_only, **kwargs)
            if runner.loaded.name == self.model_name:
                if last_only:
                    self.calls.append(("P", int((input_ids != 0).sum())))
                    if self.after_prefill is not None:
                        self.after_prefill(input_ids)
                else:
                    self.calls.append(("D", hi - lo))
            return out

        monkeypatch.setattr(ModelRunner, "forward", spy)

    def prefill_between_decodes(self) -> list[int]:
        """Prompt tokens fed between consecutive decode passes (the prefill of one step)."""
        totals, current = [], 0
        for kind, n in self.calls:
            if kind == "P":
                current += n
            elif current:
                totals.append(current)
                current = 0
        return totals


def _top2_margins(model, prompt: tuple[int, ...], output: list[int]) -> list[float]:
    """For each output token, the gap between the top two logits the target gives it, from
    one transformers forward over the whole sequence (the reference path)."""
    ids = torch.tensor([list(prompt) + output[:-1]])
    with torch.inference_mode():
        logits = model.model(ids).logits[0, len(prompt) - 1 :].float()  # [len(output), V]
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def assert_same_greedy_output(got: list[int], want: list[int], model, prompt: tuple[int, ...]) -> None:
    """Greedy outputs from two code paths are equal up to the first token where the reference's
    top two logits are within rounding of each other (CPU float32 is not batch-invariant, so
    such a near-tie may go either way; tests/support/float_compare.py). Past a divergence
    the outputs are different sequences and are not compared."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert first < min(len(got), len(want)), f"one output is a prefix of the other: {got} vs {want}"
    ids = torch.tensor([list(prompt) + want[:first]])
    with torch.inference_mode():
        logits = model.model(ids).logits[0, -1].float()
    top = logits.topk(2).values
    bound = 2 * rounding_bound(logits, FORWARD_BUDGET)
    assert (top[0] - top[1]).item() <= bound, (
        f"outputs differ at token {first} where the reference's top two logits are "
        f"{(top[0] - top[1]).item():.3g} apart, beyond rounding ({bound:.3g})"
    )


# ---- the planner -----------------------------------------------------------------------


def test_allocation_stays_within_the_budget_and_serves_short_prompts_whole() -> None:
    for remaining in ([4095, 200, 200], [10, 20, 30], [1] * 40, [5000], [3, 4000, 4000, 7], []):
        for budget in (1, 7, 64, 512, 2048):
            chunks = allocate(remaining, budget)
            assert sum(chunks) <= budget
            assert all(0 <= c <= r for c, r in zip(chunks, remaining))
            # nothing left unused while prompt tokens wait
            assert sum(chunks) == min(budget, sum(remaining))
            if remaining:  # the oldest request always progresses
                assert chunks[0] >= min(remaining[0], max(1, budget // 2))
    # One long prompt first does not hold the short ones behind it.
    assert allocate([4095, 200, 200], 512) == [256, 200, 56]
    assert allocate([4095, 4095, 100], 512) == [256, 156, 100]
    with pytest.raises(ValueError):
        allocate([3], 0)


def test_forward_groups_split_where_padding_would_dominate() -> None:
    assert forward_groups({}) == []
    assert forward_groups({0: 5, 1: 3, 2: 5}) == [[0, 1, 2]]
    # a long chunk among short ones runs in a forward of its own
    assert sorted(forward_groups({0: 3, 1: 4, 2: 500, 3: 5})) == [[0, 1, 3], [2]]
    # a sparse span is split
    groups = forward_groups({0: 40, 31: 40})
    assert sorted(groups) == [[0], [31]]
    for widths in ({0: 3, 1: 4, 2: 500, 3: 5}, {0: 1, 5: 7, 6: 7, 30: 2}, {4: 9}):
        groups = forward_groups(widths)
        assert sorted(s for g in groups for s in g) == sorted(widths)


# ---- the runner: chunks and ragged rows --------------------------------------------------


def test_a_chunked_prompt_caches_what_an_unchunked_one_does(target) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, target.vocab_size, (1, 50), generator=gen)
    whole = ModelRunner(target, 1, 128, 8, use_graphs=False, use_compile=False)
    want = whole.forward(0, 1, prompt, [0], last_only=True)  # [1, 1, V]
    chunked = ModelRunner(target, 1, 128, 8, use_graphs=False, use_compile=False)
    for at in range(0, 50, 16):
        got = chunked.forward(0, 1, prompt[:, at : at + 16], [at], last_only=True)
    assert_close_up_to_rounding(got, want, what="last prompt token's logits")
    assert_same_cache(chunked, whole, [50])


def test_ragged_rows_in_one_forward_equal_each_row_alone(target) -> None:
    """Rows of different lengths padded to one width, each with its own start (a prefill
    pass mixing new prompts and later chunks): the logits of each row's last real token and
    its cache equal prefilling that row alone."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, target.vocab_size, (n,), generator=gen) for n in (30, 9, 21)]
    alone = ModelRunner(target, 3, 128, 8, use_graphs=False, use_compile=False)
    want = [alone.forward(r, r + 1, p[None], [0], last_only=True)[0] for r, p in enumerate(prompts)]
    batched = ModelRunner(target, 3, 128, 8, use_graphs=False, use_compile=False)
    # Row 0 already has its first 12 tokens cached; rows 1 and 2 start from nothing.
    batched.forward(0, 1, prompts[0][None, :12], [0], last_only=True)
    chunks = [prompts[0][12:], prompts[1], prompts[2]]  # lengths 18, 9, 21
    ids = torch.zeros((3, 21), dtype=torch.long)
    for r, chunk in enumerate(chunks):
        ids[r, : len(chunk)] = chunk
    got = batched.forward(
        0, 3, ids, [12, 0, 0], last_only=True, lengths=[len(c) for c in chunks]
    )  # [3, 1, V]
    for r in range(3):
        assert_close_up_to_rounding(got[r], want[r], what=f"row {r}")
    assert_same_cache(batched, alone, [30, 9, 21])


# ---- the engine ------------------------------------------------------------------------


def _requests(tokenizer) -> list[GenerationRequest]:
    methods = [Method.NONE, Method.NGRAM, Method.DRAFT_MODEL]
    return [
        GenerationRequest(
            f"r{i}",
            _ids(tokenizer, text),
            max_tokens=24,
            method=methods[i % 3],
            num_draft_tokens=0 if methods[i % 3] is Method.NONE else 3,
        )
        for i, text in enumerate(TEXTS)
    ]


def test_batched_and_chunked_prefill_gives_each_request_its_output_alone(
    make_engine, target, close_draft, monkeypatch
) -> None:
    """Six requests, prompts of 3 to 60 tokens, a budget of 7 prompt tokens a pass and four
    slots: prompts are prefilled together, in chunks, while other requests decode (and the
    draft model catches up on prompts in chunks too). Each request's greedy output, and its
    counters where the adaptive policy is off, equal running it alone with prefill unchunked."""
    requests = _requests(target.tokenizer)
    assert max(len(r.prompt_token_ids) for r in requests) > 7 * 5
    alone_engine = make_engine(target, close_draft, max_batch_size=1, adaptive_draft_length=False)
    alone = {r.request_id: run(alone_engine, [r])[r.request_id] for r in requests}

    forwards, draft_forwards = Forwards(target.name), Forwards(close_draft.name)
    forwards.install(monkeypatch)
    draft_forwards.install(monkeypatch)
    engine = make_engine(
        target,
        close_draft,
        max_batch_size=4,
        max_prefill_tokens_per_pass=7,
        adaptive_draft_length=False,
        start=False,
    )
    pending = [submit(engine, r)[0] for r in requests]
    engine.start()
    outs = {o.request_id: wait_checked(o) for o in pending}  # the metrics invariants too

    for request in requests:
        got, want = outs[request.request_id], alone[request.request_id]
        assert got.final.finish_reason is want.final.finish_reason
        assert_same_greedy_output(got.tokens, want.tokens, target, request.prompt_token_ids)
        if got.tokens == want.tokens and request.method is not Method.DRAFT_MODEL:
            # (a draft-model row proposes nothing while its draft model catches up in chunks)
            assert got.metrics.verify_passes == want.metrics.verify_passes, request.request_id
            assert got.metrics.proposed_drafts == want.metrics.proposed_drafts, request.request_id
    # Chunks of one prompt were interleaved with decode passes of other requests, never more
    # than the budget between two decode passes, for the target and the draft model alike.
    kinds = "".join(kind for kind, _ in forwards.calls)
    assert "DPD" in kinds
    assert max(forwards.prefill_between_decodes()) <= 7
    assert max(n for kind, n in draft_forwards.calls if kind == "P") <= 7
    assert sum(n for kind, n in draft_forwards.calls if kind == "P") >= 30  # the draft prompts went in chunks


def test_the_budget_bounds_the_prefill_between_two_decode_passes(make_engine, target, monkeypatch) -> None:
    """A request decodes while a burst of long prompts arrives: between any two of its decode
    passes at most `budget` prompt tokens are prefilled, and the budget is used whole while
    prompt tokens wait."""
    budget = 16
    forwards = Forwards(target.name)
    forwards.install(monkeypatch)
    engine = make_engine(target, max_batch_size=6, max_prefill_tokens_per_pass=budget)
    running, _ = submit(
        engine, GenerationRequest("running", _ids(target.tokenizer, "Hi"), max_tokens=120, method=Method.NONE)
    )
    for _ in range(200):
        if running.chunks:
            break
        threading.Event().wait(0.01)
    assert running.chunks, "the running request never started"
    burst = [
        GenerationRequest(
            f"b{i}", _ids(target.tokenizer, TEXTS[i % 2] + TEXTS[4]), max_tokens=4, method=Method.NONE
        )
        for i in range(5)
    ]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in burst)
    outs = run(engine, burst)
    wait_checked(running)
    assert all(o.final.finish_reason is FinishReason.LENGTH for o in outs.values())
    totals = forwards.prefill_between_decodes()
    assert max(totals) <= budget
    assert sum(totals) >= prompt_tokens
    full = [t for t in totals if t == budget]
    assert len(full) >= prompt_tokens // budget - 1  # passes with enough waiting were full


def test_a_cancelled_long_prefill_frees_its_slot_within_one_chunk(make_engine, target, monkeypatch) -> None:
    """A long prompt in chunks of 4 tokens, cancelled after its second chunk: no further chunk
    runs, it ends CANCELLED with no token and no pass counted, and the request queued behind
    it (one slot) gets the slot."""
    forwards = Forwards(target.name)
    prompt = _ids(target.tokenizer, TEXTS[0] * 2)
    assert len(prompt) > 40 * 4
    holder: dict = {}

    def cancel_after_second_chunk(input_ids) -> None:
        if sum(1 for kind, _ in forwards.calls if kind == "P") == 2:
            holder["handle"].cancel()

    forwards.after_prefill = cancel_after_second_chunk
    forwards.install(monkeypatch)
    engine = make_engine(target, max_batch_size=1, max_prefill_tokens_per_pass=4, start=False)
    long_out, holder["handle"] = submit(
        engine, GenerationRequest("long", prompt, max_tokens=8, method=Method.NONE)
    )
    next_out, _ = submit(
        engine, GenerationRequest("next", _ids(target.tokenizer, "Hi"), max_tokens=3, method=Method.NONE)
    )
    engine.start()
    wait_checked(long_out)
    wait_checked(next_out)
    assert long_out.final.finish_reason is FinishReason.CANCELLED
    assert long_out.final.completion_tokens == 0 and long_out.metrics.verify_passes == 0
    assert not long_out.metrics.HasField("time_to_first_token_seconds")
    assert next_out.final.finish_reason is FinishReason.LENGTH
    # The long prompt's two chunks, then the next request's prompt (one chunk): nothing more
    # of the cancelled one ran.
    prefills = [n for kind, n in forwards.calls if kind == "P"]
    assert prefills == [4, 4, len(_ids(target.tokenizer, "Hi"))]


def test_a_cancel_from_another_thread_stops_a_long_prefill_within_one_chunk(
    make_engine, target, monkeypatch
) -> None:
    """As a client that leaves (or whose deadline passes; the service cancels the request
    then): cancelled from another thread while chunks run, at most one more chunk runs."""
    forwards = Forwards(target.name)
    prompt = _ids(target.tokenizer, TEXTS[0] * 2)
    started = threading.Event()
    resume = threading.Event()

    def pause_in_third_chunk(input_ids) -> None:
        if sum(1 for kind, _ in forwards.calls if kind == "P") == 3:
            started.set()
            resume.wait(30)

    forwards.after_prefill = pause_in_third_chunk
    forwards.install(monkeypatch)
    engine = make_engine(target, max_batch_size=1, max_prefill_tokens_per_pass=4)
    out, handle = submit(engine, GenerationRequest("long", prompt, max_tokens=8, method=Method.NONE))
    assert started.wait(60)
    handle.cancel()  # lands while the engine thread is inside a chunk
    resume.set()
    wait_checked(out)
    assert out.final.finish_reason is FinishReason.CANCELLED and out.final.completion_tokens == 0
    assert sum(1 for kind, _ in forwards.calls if kind == "P") <= 4
    assert not any(kind == "D" for kind, _ in forwards.calls)


def test_a_draft_row_that_does_not_propose_keeps_its_draft_cache(close_draft) -> None:
    """A draft-model row still catching up on its prompt (not ready) may sit between rows
    that propose: the drafting forwards over their slot span write its slot only past what
    its draft cache holds."""
    from types import SimpleNamespace

    from service.engine.speculation.drafters import DraftModelDrafter, DraftRow, PassContext
    from service.engine.speculation.sampling import GREEDY, BatchSampling

    runner = ModelRunner(close_draft, 3, 128, 8, use_graphs=False, use_compile=False)
    gen = torch.Generator().manual_seed(2)
    drafter = DraftModelDrafter(runner)
    rows = []
    for slot in range(3):
        tokens = torch.randint(1, close_draft.vocab_size, (20,), generator=gen).tolist()
        runner.forward(slot, slot + 1, torch.tensor([tokens[:18]]), [0], last_only=True)
        rows.append(SimpleNamespace(slot=slot, tokens=tokens))
        drafter.rows[slot] = DraftRow(cached=18)
    drafter.rows[1].cached = 6  # behind: only its first 6 tokens count as cached
    kept = [(k[1, :, :6].clone(), v[1, :, :6].clone()) for k, v in zip(*runner.cache.rows(0, 3))]
    zeros = torch.zeros((3, 8))
    ctx = PassContext(
        3,
        torch.device("cpu"),
        BatchSampling.build([GREEDY] * 3, torch.device("cpu")),
        zeros,
        zeros,
        zeros[:, 0],
        rows,
    )
    drafter.propose(ctx, [rows[0], rows[2]], 3)
    for (k, v), (k_kept, v_kept) in zip(zip(*runner.cache.rows(0, 3)), kept):
        assert torch.equal(k[1, :, :6], k_kept) and torch.equal(v[1, :, :6], v_kept)


def test_a_failing_prefill_forward_fails_its_rows_only(make_engine, target, monkeypatch) -> None:
    """A prefill forward that raises (say, out of memory on a long chunk) fails the requests
    it was feeding, with their metrics records, and the engine serves the others."""
    original = ModelRunner.forward
    long_prompt = _ids(target.tokenizer, TEXTS[0])

    def failing(self, lo, hi, input_ids, starts, last_only=False, **kwargs):
        if last_only and input_ids.shape[1] > 20:
            raise RuntimeError("prefill out of memory")
        return original(self, lo, hi, input_ids, starts, last_only, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", failing)
    engine = make_engine(target, max_batch_size=2, max_prefill_tokens_per_pass=64)
    bad, _ = submit(engine, GenerationRequest("bad", long_prompt, max_tokens=8, method=Method.NONE))
    wait_checked(bad)
    assert bad.final.finish_reason is FinishReason.ERROR and "prefill out of memory" in bad.final.error
    assert bad.final.completion_tokens == 0
    ok = run(
        engine, [GenerationRequest("ok", _ids(target.tokenizer, "Hi"), max_tokens=4, method=Method.NONE)]
    )["ok"]
    assert ok.final.finish_reason is FinishReason.LENGTH and len(ok.tokens) == 4
