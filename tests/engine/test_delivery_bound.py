"""How late a token may reach its stream (docs/engine.md, "Delivery"): a token accepted in
decode pass p is handed to the request's event callback before pass p + 1 ends, because the
tokens of a pass are flushed while the device runs the next one (EOS and length tokens at once,
right after the pass). The chunk in which a stop string is found waits for pass p + 1 (whose
drafts it cuts) and travels with the FinalResult, still before that step ends.

Measured in passes, not seconds: a pass observer counts finished steps, and each chunk records
the count when it arrived. A request alone in the engine makes the producing step of every
token known from the observer's per-row accepted drafts (a pass yields a_s + 1 tokens)."""

from __future__ import annotations

import threading

import pytest

from service.engine import GenerationRequest, Method, PassRecord, TokenChunk
from tests.engine.helpers import Outcome, wait_checked

TEXT = "Once upon a time there was"  # a prompt the tiny random target answers at length


class CountingOutcome(Outcome):
    """An Outcome that stamps every chunk with the number of steps finished at its arrival."""

    def __init__(self, request_id: str, records: list[PassRecord]) -> None:
        super().__init__(request_id)
        self.records = records
        self.steps_at_chunk: list[int] = []

    def on_event(self, event: object) -> None:
        if isinstance(event, TokenChunk):
            self.steps_at_chunk.append(len(self.records))
        super().on_event(event)


def producing_steps(records: list[PassRecord]) -> list[int]:
    """For the lone request's k-th token (0-based), the 1-based index of the step that made it."""
    steps: list[int] = []
    for index, record in enumerate(records, start=1):
        if record.prefill_rows and not record.rows and not steps:
            continue  # a prefill-only step still in the prompt: no token yet
        made = 0
        if record.rows:
            assert record.rows == 1, "the request must be alone"
            made = (record.accepted[0] + 1) if record.accepted else 0
        if not steps and record.prefill_rows:
            made += 1  # the prefill's last chunk samples the first token
        steps.extend([index] * made)
    return steps


def run_counted(engine, request: GenerationRequest, records: list[PassRecord]) -> CountingOutcome:
    out = CountingOutcome(request.request_id, records)
    engine.submit(request, out.on_event)
    return wait_checked(out)


@pytest.mark.parametrize("method", [Method.NONE, Method.DRAFT_MODEL])
def test_a_token_reaches_its_stream_before_the_next_pass_ends(
    make_engine, target, same_draft, tokenizer, method
) -> None:
    """With the target as its own draft model every draft is accepted: passes of several tokens."""
    engine = make_engine(target, same_draft, start=False, max_batch_size=2, adaptive_draft_length=False)
    records: list[PassRecord] = []
    lock = threading.Lock()

    def observe(record: PassRecord) -> None:
        with lock:
            records.append(record)

    engine.add_pass_observer(observe)
    engine.start()
    ids = tuple(tokenizer.encode(TEXT, add_special_tokens=False))
    request = GenerationRequest("late", ids, max_tokens=40, method=method, num_draft_tokens=4)
    out = run_counted(engine, request, records)

    made_in = producing_steps(records)
    delivered = 0
    assert len(out.chunks) == len(out.steps_at_chunk) > 1
    for chunk, finished_steps in zip(out.chunks, out.steps_at_chunk, strict=True):
        delivered += len(chunk.token_ids)
        if not chunk.token_ids:
            continue
        last_token_step = made_in[delivered - 1]
        # delivered while step last_token_step + 1 ran (or earlier): at most that many finished
        assert finished_steps <= last_token_step, (delivered, finished_steps, last_token_step)
    assert delivered == len(made_in) == out.final.completion_tokens
    assert out.final.completion_tokens >= 8, "too short to say anything"
    if method is Method.DRAFT_MODEL:
        assert any(len(c.token_ids) > 1 for c in out.chunks), "no pass gave several tokens"
        assert all(len(c.token_ids) >= 1 for c in out.chunks)


def test_the_chunk_a_stop_string_ends_keeps_the_bound(make_engine, target, tokenizer) -> None:
    """A stop string is found while the next pass runs; the chunk it ends waits for that pass
    and travels with the FinalResult, before the step is over."""
    ids = tuple(tokenizer.encode(TEXT, add_special_tokens=False))
    plain = make_engine(target, max_batch_size=2, adaptive_draft_length=False)
    free = run_counted(plain, GenerationRequest("free", ids, max_tokens=40, method=Method.NONE), [])
    text = free.text
    assert len(free.chunks) >= 12, "too short to cut"
    stop = "".join(c.text for c in free.chunks[8:10])[-3:]  # ends in the 10th chunk's text
    assert stop.strip() and text.index(stop) >= len("".join(c.text for c in free.chunks[:7]))

    engine = make_engine(target, start=False, max_batch_size=2, adaptive_draft_length=False)
    records: list[PassRecord] = []
    engine.add_pass_observer(records.append)
    engine.start()
    request = GenerationRequest("cut", ids, max_tokens=40, method=Method.NONE, stop=(stop,))
    out = run_counted(engine, request, records)
    assert out.final.finish_reason.name == "STOP_SEQUENCE"
    made_in = producing_steps(records)
    delivered = 0
    for i, (chunk, finished_steps) in enumerate(zip(out.chunks, out.steps_at_chunk, strict=True)):
        delivered += len(chunk.token_ids)
        if chunk.token_ids:
            assert finished_steps <= made_in[delivered - 1], (i, finished_steps)
