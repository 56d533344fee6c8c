"""Every target pass that ran for a request is in its metrics (docs/metrics-contract.md, "What
counts as a pass"), also the pass that was running when a stop string or a failure ended it.

The target's forwards are counted where the engine makes them (ModelRunner.forward): a lone
request's decode forwards are its verify passes, and the width of each is 1 + its d_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from service.engine import FinishReason, GenerationRequest, Method
from service.engine.execution.runner import ModelRunner
from tests.engine.helpers import Outcome, run, submit, wait_checked


@dataclass
class TargetPasses:
    """The decode forwards of the runner of one model: d_s per pass."""

    model_name: str
    drafts: list[int] = field(default_factory=list)

    def install(self, monkeypatch) -> None:
        original = ModelRunner.forward

        def counting(runner, lo, hi, input_ids, starts, last_only=False, **kwargs):
            if runner.loaded.name == self.model_name and not last_only:
                self.drafts.append(input_ids.shape[1] - 1)
            return original(runner, lo, hi, input_ids, starts, last_only, **kwargs)

        monkeypatch.setattr(ModelRunner, "forward", counting)

    def assert_counted_in(self, out: Outcome) -> None:
        m = out.metrics
        assert m.verify_passes == len(self.drafts), (m.verify_passes, self.drafts)
        assert m.proposed_drafts == sum(self.drafts), (m.proposed_drafts, self.drafts)
        assert m.draft_passes == sum(1 for d in self.drafts if d), (m.draft_passes, self.drafts)


def _ids(tokenizer) -> tuple[int, ...]:
    # With this prompt the loopy model runs to 40 tokens, and n-gram lookups hit.
    return tuple(tokenizer.encode("def add(x, y):\n", add_special_tokens=False))


def _late_stop_string(text: str, early: int) -> str:
    """The shortest substring of `text` that first occurs at or after character `early`:
    a stop string found in a decode pass's tokens, not in the prefill's."""
    for size in range(2, 16):
        for i in range(early, len(text) - size):
            candidate = text[i : i + size]
            if candidate.isascii() and candidate.isprintable() and text.index(candidate) >= early:
                return candidate
    raise AssertionError(f"no late stop string in {text!r}")


def _engine(make_engine, loopy, loopy_draft):
    # A fixed k: every pass proposes what its drafter has, so the draft model proposes k.
    return make_engine(loopy, draft=loopy_draft, adaptive_draft_length=False)


@pytest.mark.parametrize("method", [Method.NONE, Method.NGRAM, Method.DRAFT_MODEL])
def test_the_pass_running_when_a_stop_string_is_found_is_counted(
    make_engine, loopy, loopy_draft, method, monkeypatch
) -> None:
    engine = _engine(make_engine, loopy, loopy_draft)
    ids = _ids(loopy.tokenizer)
    plain = run(engine, [GenerationRequest("p", ids, max_tokens=40, method=Method.NONE)])["p"]
    stop = _late_stop_string(plain.text, len(loopy.tokenizer.decode(plain.tokens[:8])))
    passes = TargetPasses(loopy.name)
    passes.install(monkeypatch)
    out = run(engine, [GenerationRequest("s", ids, max_tokens=40, method=method, stop=(stop,))])["s"]
    assert out.final.finish_reason is FinishReason.STOP_SEQUENCE
    assert 3 <= out.final.completion_tokens < 40
    if method is not Method.NONE:
        assert out.metrics.proposed_drafts > 0  # drafts were proposed, in the last pass too
    # The pass during which the stop string was found ran too: one more than the output needed.
    assert out.final.completion_tokens <= out.metrics.verify_passes + out.metrics.accepted_drafts
    passes.assert_counted_in(out)


@pytest.mark.parametrize("method", [Method.NONE, Method.NGRAM, Method.DRAFT_MODEL])
def test_the_pass_running_when_a_request_fails_in_the_flush_is_counted(
    make_engine, loopy, loopy_draft, method, monkeypatch
) -> None:
    engine = _engine(make_engine, loopy, loopy_draft)
    passes = TargetPasses(loopy.name)
    passes.install(monkeypatch)
    out = Outcome("f")
    chunks = []

    def on_event(event) -> None:
        if type(event).__name__ == "TokenChunk":
            chunks.append(event)
            if len(chunks) == 4:  # the prefill's chunk, then three flushed while a pass runs
                raise RuntimeError("client went away")
        out.on_event(event)

    engine.submit(GenerationRequest("f", _ids(loopy.tokenizer), max_tokens=40, method=method), on_event)
    assert out.done.wait(300)
    assert out.final.finish_reason is FinishReason.ERROR and "client went away" in out.final.error
    passes.assert_counted_in(out)


def test_the_pass_running_when_a_drafter_fails_is_counted(
    make_engine, loopy, loopy_draft, monkeypatch
) -> None:
    from service.engine.speculation.drafters import NgramDrafter

    engine = _engine(make_engine, loopy, loopy_draft)
    passes = TargetPasses(loopy.name)
    passes.install(monkeypatch)
    original = NgramDrafter.while_device_runs

    def failing(self, seq):
        if seq.completion_tokens >= 6:
            raise RuntimeError("index broke")
        original(self, seq)

    monkeypatch.setattr(NgramDrafter, "while_device_runs", failing)
    out = run(engine, [GenerationRequest("d", _ids(loopy.tokenizer), max_tokens=40, method=Method.NGRAM)])[
        "d"
    ]
    assert out.final.finish_reason is FinishReason.ERROR and "index broke" in out.final.error
    passes.assert_counted_in(out)


def test_a_lone_request_to_its_length_limit_counts_every_pass(
    make_engine, loopy, loopy_draft, monkeypatch
) -> None:
    """The reference case: no stop string, nothing cut; every decode forward is a counted pass."""
    engine = _engine(make_engine, loopy, loopy_draft)
    passes = TargetPasses(loopy.name)
    passes.install(monkeypatch)
    out = wait_checked(
        submit(engine, GenerationRequest("l", _ids(loopy.tokenizer), max_tokens=30, method=Method.NGRAM))[0]
    )
    assert out.final.finish_reason is FinishReason.LENGTH
    passes.assert_counted_in(out)


def test_a_failure_recording_that_pass_ends_no_other_request(
    make_engine, loopy, loopy_draft, monkeypatch
) -> None:
    """The ended row's FinalResult waits for its last pass's bookkeeping: if that fails, the
    request still gets its FinalResult and the rows batched with it carry on."""
    from service.engine.request_metrics import SpecDecodeStats

    engine = _engine(make_engine, loopy, loopy_draft)
    ids = _ids(loopy.tokenizer)
    plain = run(engine, [GenerationRequest("p", ids, max_tokens=40, method=Method.NONE)])["p"]
    stop = _late_stop_string(plain.text, len(loopy.tokenizer.decode(plain.tokens[:8])))
    armed = []
    original = SpecDecodeStats.record_pass

    def record_pass(self, proposed, accepted):
        if armed:  # the first record after the stop chunk: the stopped row's last pass
            armed.clear()
            raise RuntimeError("bookkeeping broke")
        original(self, proposed, accepted)

    monkeypatch.setattr(SpecDecodeStats, "record_pass", record_pass)
    from service.engine.output import OutputProcessor

    finish = OutputProcessor.finish

    def finish_and_arm(self, seq, reason, *args, **kwargs) -> None:
        if reason is FinishReason.STOP_SEQUENCE:
            armed.append(True)  # the flush found the stop string while a pass runs
        finish(self, seq, reason, *args, **kwargs)

    monkeypatch.setattr(OutputProcessor, "finish", finish_and_arm)
    stopped = Outcome("s")
    other = submit(engine, GenerationRequest("o", ids, max_tokens=40, method=Method.NONE))[0]
    engine.submit(
        GenerationRequest("s", ids, max_tokens=40, method=Method.NONE, stop=(stop,)), stopped.on_event
    )
    assert stopped.done.wait(300), "the stopped request never got its FinalResult"
    assert stopped.final.finish_reason is FinishReason.STOP_SEQUENCE
    wait_checked(other)
    assert other.final.finish_reason is FinishReason.LENGTH and len(other.tokens) == 40
