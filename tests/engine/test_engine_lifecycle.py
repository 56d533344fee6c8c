"""Engine API behaviour: validation, queue, cancellation, stop/drain, errors, finish reasons."""

from __future__ import annotations

import gc
import math
import threading
import time

import pytest

from service.engine import (
    Engine,
    EngineConfig,
    EngineStoppedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Method,
    QueueFullError,
    SamplingParams,
)
from service.engine.execution.runner import ModelRunner
from tests.engine.helpers import Outcome, make_model, run, submit, wait_checked


def _ids(tokenizer, text: str = "The quick brown fox") -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


BAD = [
    ("input", dict(prompt_token_ids=())),
    ("input", dict(prompt_token_ids=(1, 99_999))),
    ("input", dict(prompt_token_ids=(1, -1))),
    ("input", dict(prompt_token_ids=tuple(range(1, 300)) * 2)),  # longer than the context (512)
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("sampling.temperature", dict(sampling=SamplingParams(temperature=-0.5))),
    ("sampling.temperature", dict(sampling=SamplingParams(temperature=math.nan))),
    ("sampling.top_p", dict(sampling=SamplingParams(temperature=1.0, top_p=0.0))),
    ("sampling.top_p", dict(sampling=SamplingParams(temperature=1.0, top_p=1.5))),
    ("sampling.top_p", dict(sampling=SamplingParams(temperature=1.0, top_p=math.nan))),
    ("sampling.top_k", dict(sampling=SamplingParams(temperature=1.0, top_k=-1))),
    ("speculation.num_draft_tokens", dict(num_draft_tokens=9)),
    ("speculation.num_draft_tokens", dict(num_draft_tokens=-1)),
    ("speculation.method", dict(method=Method.DRAFT_MODEL)),  # no draft model loaded
]


@pytest.mark.parametrize("field,changes", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_names_the_field_and_engine_keeps_serving(make_engine, target, field, changes) -> None:
    engine = make_engine(target, max_num_draft_tokens=8)
    fields = dict(request_id="bad", prompt_token_ids=_ids(target.tokenizer), max_tokens=5)
    fields.update(changes)
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest(**fields), lambda event: None)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")
    good = run(engine, [GenerationRequest("good", _ids(target.tokenizer), max_tokens=5)])["good"]
    assert good.final.finish_reason is FinishReason.LENGTH and len(good.tokens) == 5


def test_vocabulary_mismatch_is_a_startup_error(target, tokenizer) -> None:
    wrong = make_model(tokenizer, seed=9, name="wrong-vocab", vocab_size=len(tokenizer) + 7)
    with pytest.raises(ValueError, match=r"wrong-vocab.*327.*tiny-target.*320"):
        Engine(target, EngineConfig(kv_cache_tokens=64), draft=wrong)


def test_info(make_engine, target, close_draft) -> None:
    info = make_engine(
        target, draft=close_draft, start=False, max_context_tokens=100, default_num_draft_tokens=3
    ).info
    assert (info.target_model, info.draft_model, info.device, info.dtype) == (
        "tiny-target",
        "tiny-close",
        "cpu",
        "float32",
    )
    assert (
        info.max_context_tokens == 100
        and info.default_num_draft_tokens == 3
        and info.max_num_draft_tokens == 8
    )
    assert info.default_method is Method.NGRAM and info.max_batch_size == 8 and info.vocab_size == 320
    assert set(info.methods) == {Method.NONE, Method.NGRAM, Method.DRAFT_MODEL}
    assert make_engine(target, start=False, kv_cache_tokens=64).info.max_context_tokens == 64


def test_warmup_runs_every_method(make_engine, target, close_draft) -> None:
    make_engine(target, draft=close_draft).warmup(timeout_s=60)


def test_cancel_mid_generation_frees_the_slot(make_engine, target) -> None:
    engine = make_engine(target, max_batch_size=1)
    holder: dict = {}
    long_req = GenerationRequest("long", _ids(target.tokenizer), max_tokens=400, method=Method.NGRAM)
    out, handle = submit(engine, long_req)
    holder["handle"] = handle
    # queued behind it (one slot): a second request, and a third we cancel while queued
    nxt, _ = submit(
        engine, GenerationRequest("next", _ids(target.tokenizer), max_tokens=5, method=Method.NONE)
    )
    queued, queued_handle = submit(engine, GenerationRequest("queued", _ids(target.tokenizer), max_tokens=5))
    queued_handle.cancel()
    handle.cancel()  # may land before or during generation: both must free the slot
    wait_checked(out)
    assert out.final.finish_reason is FinishReason.CANCELLED
    assert out.final.completion_tokens < 400
    assert wait_checked(nxt).final.finish_reason is FinishReason.LENGTH
    assert wait_checked(queued).final.finish_reason is FinishReason.CANCELLED
    assert queued.final.completion_tokens == 0 and queued.metrics.verify_passes == 0


def test_cancel_from_the_token_callback(make_engine, target) -> None:
    """Cancelled from the 3rd chunk's callback: the FinalResult's metrics count exactly the
    work done, and every token counted was delivered. A pass's tokens are delivered while
    the next pass runs, so the 3rd chunk (token 3, from pass 2) goes out during pass 3,
    whose token is delivered before the FinalResult."""
    engine = make_engine(target, max_batch_size=1)
    handle_box: list = []
    out = Outcome("c")

    def on_event(event) -> None:
        out.on_event(event)
        if len(out.chunks) == 3:
            handle_box[0].cancel()

    handle_box.append(
        engine.submit(
            GenerationRequest("c", _ids(target.tokenizer), max_tokens=400, method=Method.NONE), on_event
        )
    )
    wait_checked(out)
    assert out.final.finish_reason is FinishReason.CANCELLED
    assert out.final.completion_tokens == 4 and out.metrics.verify_passes == 3
    assert [len(c.token_ids) for c in out.chunks] == [1, 1, 1, 1]
    after = run(engine, [GenerationRequest("after", _ids(target.tokenizer), max_tokens=4)])["after"]
    assert after.final.finish_reason is FinishReason.LENGTH


def test_queue_full_is_refused(make_engine, target) -> None:
    engine = make_engine(target, start=False, max_batch_size=1, max_queue_size=2)
    pending = [
        submit(engine, GenerationRequest(f"r{i}", _ids(target.tokenizer), max_tokens=3))[0] for i in range(3)
    ]
    with pytest.raises(QueueFullError):
        engine.submit(GenerationRequest("r3", _ids(target.tokenizer), max_tokens=3), lambda e: None)
    engine.start()
    for out in pending:
        assert wait_checked(out).final.finish_reason is FinishReason.LENGTH


def test_stop_cancels_queued_requests_at_once_and_drains_running_ones(make_engine, target) -> None:
    engine = make_engine(target, max_batch_size=2)
    ids = _ids(target.tokenizer)
    release = threading.Event()
    running = [Outcome(f"run{i}") for i in range(2)]
    for out in running:

        def on_event(event, out=out) -> None:
            out.on_event(event)
            if all(o.chunks for o in running):  # both hold a batch slot: hold the engine thread
                release.wait(60)

        engine.submit(GenerationRequest(out.request_id, ids, max_tokens=30, method=Method.NGRAM), on_event)
    stopper = threading.Thread(target=engine.stop, kwargs={"drain_timeout_s": None})
    try:
        deadline = time.monotonic() + 60
        while not all(out.chunks for out in running):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = [submit(engine, GenerationRequest(f"q{i}", ids, max_tokens=30))[0] for i in range(3)]
        assert engine.queue_depth() == 3
        stopper.start()
        # The queued requests end while the running ones cannot advance at all.
        for out in queued:
            assert wait_checked(out, timeout=10).final.finish_reason is FinishReason.CANCELLED
            assert not out.chunks
        assert not any(out.done.is_set() for out in running)
        with pytest.raises(EngineStoppedError):
            engine.submit(GenerationRequest("late", ids), lambda e: None)
    finally:
        release.set()
    stopper.join(60)
    for out in running:
        assert wait_checked(out, timeout=1).final.finish_reason is FinishReason.LENGTH


def test_stop_timeout_cancels_the_rest(make_engine, target) -> None:
    engine = make_engine(target, max_batch_size=1)
    pending = [
        submit(engine, GenerationRequest(f"r{i}", _ids(target.tokenizer), max_tokens=400))[0]
        for i in range(3)
    ]
    engine.stop(drain_timeout_s=0.0)
    reasons = [wait_checked(out, timeout=1).final.finish_reason for out in pending]
    assert reasons.count(FinishReason.CANCELLED) >= 2  # nothing lost: every request got its final


def test_failing_callback_fails_only_its_request(make_engine, target) -> None:
    engine = make_engine(target, max_batch_size=4)
    finals = []

    def bad(event) -> None:
        if type(event).__name__ == "FinalResult":
            finals.append(event)
        else:
            raise RuntimeError("client went away")

    engine.submit(GenerationRequest("bad", _ids(target.tokenizer), max_tokens=20), bad)
    good = run(engine, [GenerationRequest("good", _ids(target.tokenizer), max_tokens=20)])["good"]
    assert good.final.finish_reason is FinishReason.LENGTH
    assert finals and finals[0].finish_reason is FinishReason.ERROR and "client went away" in finals[0].error


def test_failed_forward_fails_its_batch_and_engine_continues(make_engine, target, monkeypatch) -> None:
    engine = make_engine(target, max_batch_size=4, start=False)
    calls = {"n": 0}
    original = ModelRunner.forward

    def flaky(self, lo, hi, input_ids, starts, last_only=False, **kwargs):
        if not last_only:  # a decode pass (prefills return the last token's logits only)
            calls["n"] += 1
            if calls["n"] == 2:  # the 2nd decode pass fails
                raise RuntimeError("boom")
        return original(self, lo, hi, input_ids, starts, last_only, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", flaky)
    pending = [
        submit(engine, GenerationRequest(f"f{i}", _ids(target.tokenizer), max_tokens=20, method=Method.NONE))[
            0
        ]
        for i in range(2)
    ]
    engine.start()
    for out in pending:
        wait_checked(out)
        assert out.final.finish_reason is FinishReason.ERROR and "boom" in out.final.error
        assert out.final.completion_tokens == 2  # the work done before the failure is reported
        assert out.metrics.verify_passes == 1
    again = run(engine, [GenerationRequest("ok", _ids(target.tokenizer), max_tokens=5)])["ok"]
    assert again.final.finish_reason is FinishReason.LENGTH


def test_eos_ends_the_request_without_text(make_engine, target) -> None:
    plain = run(
        make_engine(target),
        [GenerationRequest("p", _ids(target.tokenizer), max_tokens=12, method=Method.NONE)],
    )["p"]
    eos = plain.tokens[5]
    eos_model = make_model(
        target.tokenizer, seed=0, name="tiny-eos", vocab_size=target.vocab_size
    )  # = target
    eos_model.model.generation_config.eos_token_id = [0, eos]  # the engine reads the generation config
    engine = make_engine(eos_model)
    for method in (Method.NONE, Method.NGRAM):
        out = run(
            engine,
            [GenerationRequest(f"e{method.name}", _ids(target.tokenizer), max_tokens=12, method=method)],
        )
        out = out[f"e{method.name}"]
        first = plain.tokens.index(eos)
        assert out.final.finish_reason is FinishReason.EOS
        assert out.tokens == plain.tokens[: first + 1]  # the EOS id is reported ...
        assert out.text == target.tokenizer.decode(plain.tokens[:first])  # ... its text is not


def test_stop_string_cuts_text_for_every_method(make_engine, target, close_draft) -> None:
    engine = make_engine(target, draft=close_draft)
    plain = run(engine, [GenerationRequest("p", _ids(target.tokenizer), max_tokens=40, method=Method.NONE)])[
        "p"
    ]
    text = plain.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.index(stop)]
    for method in Method:
        out = run(
            engine,
            [
                GenerationRequest(
                    f"s{method.name}",
                    _ids(target.tokenizer),
                    max_tokens=40,
                    method=method,
                    stop=(stop, "\x00never"),
                )
            ],
        )
        out = out[f"s{method.name}"]
        assert out.final.finish_reason is FinishReason.STOP_SEQUENCE
        assert out.text == cut
        assert out.tokens == plain.tokens[: len(out.tokens)]
        assert out.final.completion_tokens == len(out.tokens)  # tokens after the stop string taken back


def test_text_equals_full_decode(make_engine, target) -> None:
    engine = make_engine(target)
    outs = run(
        engine,
        [
            GenerationRequest(f"t{i}", _ids(target.tokenizer, p), max_tokens=60)
            for i, p in enumerate(["café 日本", "🙂🚀", "x"])
        ],
    )
    for out in outs.values():
        assert out.text == target.tokenizer.decode(out.tokens, skip_special_tokens=True)


def test_context_limit_and_budget(make_engine, target, same_draft) -> None:
    engine = make_engine(target, draft=same_draft, max_context_tokens=40, max_num_draft_tokens=5)
    prompt = _ids(target.tokenizer, "The quick brown fox jumps over the lazy dog.")
    for method in Method:
        out = run(
            engine,
            [GenerationRequest(f"c{method.name}", prompt, max_tokens=100, method=method, num_draft_tokens=5)],
        )
        out = out[f"c{method.name}"]
        assert out.final.finish_reason is FinishReason.LENGTH
        assert len(prompt) + len(out.tokens) == 40
    # the budget caps proposals: 3 tokens = the prefill token + one pass of at most 1 draft + bonus
    out = run(
        engine, [GenerationRequest("b", prompt, max_tokens=3, method=Method.DRAFT_MODEL, num_draft_tokens=5)]
    )["b"]
    m = out.metrics
    assert (len(out.tokens), m.verify_passes, m.proposed_drafts, m.accepted_drafts) == (3, 1, 1, 1)
    assert list(m.accept_histogram) == [0, 1, 0, 0, 0, 0]


def test_ngram_misses_give_zero_drafts(make_engine, target) -> None:
    engine = make_engine(target, ngram_min_n=3, ngram_max_n=3)
    out = run(
        engine,
        [
            GenerationRequest(
                "m", _ids(target.tokenizer, "abc"), max_tokens=30, method=Method.NGRAM, num_draft_tokens=4
            )
        ],
    )["m"]
    m = out.metrics
    assert m.verify_passes > m.draft_passes  # passes with d_s = 0 count as verify passes only
    assert m.proposed_drafts < 4 * m.verify_passes


def test_concurrent_submitters(make_engine, target) -> None:
    engine = make_engine(target, max_batch_size=4, max_queue_size=64)
    results: dict = {}

    def worker(n: int) -> None:
        reqs = [
            GenerationRequest(f"w{n}-{i}", _ids(target.tokenizer), max_tokens=8, method=Method(1 + i % 2))
            for i in range(5)
        ]
        results.update(run(engine, reqs))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    assert len({tuple(o.tokens) for o in results.values()}) == 1  # same prompt, greedy


def test_failed_draft_backlog_fails_only_its_request(make_engine, target, close_draft, monkeypatch) -> None:
    """A draft model's prefill waits for a row's first drafting pass and runs before the pass,
    for all rows behind in one forward (DraftModelDrafter.prepare_rows): if it fails (say, out
    of memory on a long prompt), the rows are fed one by one (prepare), that request fails and
    the others in the batch carry on, with output equal to running alone."""
    from service.engine.execution.runner import ModelRunner

    long_prompt = _ids(target.tokenizer) * 3
    original = ModelRunner.forward

    def failing(self, lo, hi, input_ids, starts, last_only=False, **kwargs):
        if self.loaded is close_draft and input_ids.shape[1] > len(long_prompt) // 2:
            raise RuntimeError("draft out of memory")
        return original(self, lo, hi, input_ids, starts, last_only, **kwargs)

    alone = run(
        make_engine(target, close_draft),
        [GenerationRequest("ok-alone", _ids(target.tokenizer), max_tokens=16, method=Method.DRAFT_MODEL)],
    )["ok-alone"]
    monkeypatch.setattr(ModelRunner, "forward", failing)
    engine = make_engine(target, close_draft, max_batch_size=4)
    bad, _ = submit(
        engine, GenerationRequest("bad", tuple(long_prompt), max_tokens=16, method=Method.DRAFT_MODEL)
    )
    good = run(
        engine,
        [
            GenerationRequest("ok", _ids(target.tokenizer), max_tokens=16, method=Method.DRAFT_MODEL),
            GenerationRequest("plain", _ids(target.tokenizer), max_tokens=16, method=Method.NONE),
        ],
    )
    wait_checked(bad)
    assert bad.final.finish_reason is FinishReason.ERROR and "draft out of memory" in bad.final.error
    assert good["ok"].final.finish_reason is FinishReason.LENGTH
    assert good["ok"].tokens == alone.tokens
    assert good["plain"].final.finish_reason is FinishReason.LENGTH


def test_rows_behind_catch_up_in_one_draft_forward(make_engine, target, close_draft, monkeypatch) -> None:
    """Draft-model rows admitted together feed their prompts to the draft model in one eager
    forward (prompts of different lengths, zero-padded; a plain row's slot in between), and
    each request's output and counters equal running it alone."""
    from service.engine.execution.runner import ModelRunner

    catch_up_widths = []
    original = ModelRunner.forward

    def spy(self, lo, hi, input_ids, starts, last_only=False, **kwargs):
        if self.loaded is close_draft and last_only:
            catch_up_widths.append((hi - lo, input_ids.shape[1]))
        return original(self, lo, hi, input_ids, starts, last_only, **kwargs)

    prompts = [
        _ids(target.tokenizer, "The quick brown fox"),
        _ids(target.tokenizer),
        _ids(target.tokenizer, "A longer prompt for the draft model to catch up on, token by token."),
    ]
    requests = [
        GenerationRequest("d0", prompts[0], max_tokens=20, method=Method.DRAFT_MODEL, num_draft_tokens=3),
        GenerationRequest("p1", prompts[1], max_tokens=20, method=Method.NONE),
        GenerationRequest("d2", prompts[2], max_tokens=20, method=Method.DRAFT_MODEL, num_draft_tokens=3),
    ]
    alone_engine = make_engine(target, close_draft, max_batch_size=1)
    alone = {r.request_id: run(alone_engine, [r])[r.request_id] for r in requests}
    monkeypatch.setattr(ModelRunner, "forward", spy)
    engine = make_engine(target, close_draft, max_batch_size=4, start=False)
    pending = [submit(engine, r)[0] for r in requests]
    engine.start()  # all three are admitted in the first turn
    outs = {o.request_id: wait_checked(o) for o in pending}
    # One catch-up forward over slots 0..2, as wide as the longest prompt (the first token
    # generated is fed by the pass itself).
    assert catch_up_widths == [(3, len(prompts[2]))]
    for request_id, out in outs.items():
        assert out.tokens == alone[request_id].tokens, request_id
        got, want = out.metrics, alone[request_id].metrics
        assert (got.proposed_drafts, got.accepted_drafts) == (want.proposed_drafts, want.accepted_drafts), (
            request_id
        )


def test_the_heap_alive_at_start_is_frozen_while_the_engine_runs(make_engine, target) -> None:
    assert gc.get_freeze_count() == 0
    engine = make_engine(target)
    run(engine, [GenerationRequest("a", _ids(target.tokenizer), max_tokens=3)])  # the engine has started
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # torch, transformers and the model, out of the collector's walks
    engine.stop(drain_timeout_s=0)
    assert gc.get_freeze_count() == 0  # a stopped engine leaves the collector as it was


def test_engines_of_one_process_share_the_frozen_heap(make_engine, target) -> None:
    first, second = make_engine(target), make_engine(target)
    for engine in (first, second):
        run(engine, [GenerationRequest("a", _ids(target.tokenizer), max_tokens=3)])
    first.stop(drain_timeout_s=0)
    assert gc.get_freeze_count() > 10_000  # the second engine still runs: still frozen
    second.stop(drain_timeout_s=0)
    assert gc.get_freeze_count() == 0


def test_freezing_the_heap_can_be_turned_off(make_engine, target) -> None:
    engine = make_engine(target, freeze_gc_after_start=False)
    run(engine, [GenerationRequest("a", _ids(target.tokenizer), max_tokens=3)])
    assert gc.get_freeze_count() == 0


def test_a_drafter_failing_while_the_device_runs_fails_only_its_request(
    make_engine, target, monkeypatch
) -> None:
    """The n-gram drafter indexes new tokens while the device runs a pass: if that fails for
    one row, that request fails once the pass is over, and the others carry on unchanged."""
    from service.engine.speculation.drafters import NgramDrafter

    ids = _ids(target.tokenizer)
    alone = run(make_engine(target), [GenerationRequest("alone", ids, max_tokens=16, method=Method.NGRAM)])[
        "alone"
    ]
    original = NgramDrafter.while_device_runs

    def failing(self, seq):
        if seq.request_id == "bad" and seq.completion_tokens >= 4:
            raise RuntimeError("index broke")
        original(self, seq)

    monkeypatch.setattr(NgramDrafter, "while_device_runs", failing)
    outs = run(
        make_engine(target, max_batch_size=4),
        [
            GenerationRequest("bad", ids, max_tokens=16, method=Method.NGRAM),
            GenerationRequest("ok", ids, max_tokens=16, method=Method.NGRAM),
        ],
    )
    assert outs["bad"].final.finish_reason is FinishReason.ERROR and "index broke" in outs["bad"].final.error
    assert 4 <= len(outs["bad"].tokens) < 16
    assert outs["ok"].final.finish_reason is FinishReason.LENGTH and outs["ok"].tokens == alone.tokens


@pytest.mark.parametrize("prefill_budget", [2048, 16])
def test_an_ngram_prompt_is_indexed_while_the_device_prefills_it(
    make_engine, target, monkeypatch, prefill_budget
) -> None:
    """The n-gram index takes in the prompt while the device runs the prefill passes, chunk by
    chunk (up to what is cached), so no lookup (on the host, between two passes, with the device
    idle) indexes more than the tokens the last decode pass added: at most k + 1. Before, the
    first lookup indexed the whole prompt there."""
    from service.engine.speculation.drafters import NgramDrafter, NgramIndex

    k = 4
    prompt = _ids(target.tokenizer, "one two three four five six seven eight nine ten " * 4)
    assert len(prompt) > 4 * (k + 1) and len(prompt) > 2 * 16
    unindexed: list[int] = []
    during_prefill: list[tuple[int, int]] = []  # (indexed, cached) after each prefill pass's work
    lookup, while_device_runs = NgramIndex.lookup, NgramDrafter.while_device_runs

    def recording_lookup(self, tokens, limit):
        unindexed.append(len(tokens) - self._indexed)
        return lookup(self, tokens, limit)

    def recording_work(self, seq):
        while_device_runs(self, seq)
        if not seq.decoding:
            during_prefill.append((self.rows[seq.slot].index._indexed, seq.target_len))

    monkeypatch.setattr(NgramIndex, "lookup", recording_lookup)
    monkeypatch.setattr(NgramDrafter, "while_device_runs", recording_work)
    engine = make_engine(
        target,
        adaptive_draft_length=False,
        default_num_draft_tokens=k,
        max_prefill_tokens_per_pass=prefill_budget,
    )
    out = run(engine, [GenerationRequest("p", prompt, max_tokens=12, method=Method.NGRAM)])["p"]
    assert out.final.finish_reason is FinishReason.LENGTH
    assert all(indexed == cached for indexed, cached in during_prefill)
    assert len(during_prefill) == -(-len(prompt) // prefill_budget)  # one per prefill pass
    assert during_prefill[-1][0] == len(prompt)
    assert unindexed and unindexed[0] == 1  # the first lookup: only the first generated token is new
    assert max(unindexed) <= k + 1


def test_a_drafter_failing_while_the_device_prefills_fails_only_its_request(
    make_engine, target, monkeypatch
) -> None:
    """The drafters' host work during a prefill pass is guarded per row, as a decode pass's is."""
    from service.engine.speculation.drafters import NgramDrafter

    ids = _ids(target.tokenizer)
    alone = run(make_engine(target), [GenerationRequest("alone", ids, max_tokens=16, method=Method.NGRAM)])[
        "alone"
    ]
    original = NgramDrafter.while_device_runs

    def failing(self, seq):
        if seq.request_id == "bad" and not seq.decoding:
            raise RuntimeError("prompt index broke")
        original(self, seq)

    monkeypatch.setattr(NgramDrafter, "while_device_runs", failing)
    engine = make_engine(target, max_batch_size=4)
    outs = run(
        engine,
        [
            GenerationRequest("bad", ids, max_tokens=16, method=Method.NGRAM),
            GenerationRequest("ok", ids, max_tokens=16, method=Method.NGRAM),
        ],
    )
    bad = outs["bad"].final
    assert bad.finish_reason is FinishReason.ERROR and "prompt index broke" in bad.error
    assert outs["bad"].tokens == []
    assert outs["ok"].final.finish_reason is FinishReason.LENGTH and outs["ok"].tokens == alone.tokens
    # the failed row's slot was given back: the engine serves a full batch after it
    more = run(engine, [GenerationRequest(f"m{i}", ids, max_tokens=4, method=Method.NGRAM) for i in range(4)])
    assert all(o.final.finish_reason is FinishReason.LENGTH for o in more.values())
