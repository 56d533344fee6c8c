"""OutputProcessor: tokens accepted after a pass, delivered by the next flush (while the next
pass runs); stop conditions, taken-back tokens, and events in order."""

from __future__ import annotations

import time

from service.engine.api import FinalResult, FinishReason, GenerationRequest, Method, TokenChunk
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.output import OutputProcessor
from service.engine.request_metrics import RequestIdentity, RequestTiming, SpecDecodeStats
from service.engine.sequence import Handle, Sequence
from service.engine.speculation.sampling import GREEDY

EOS = 0


def _sequence(tokenizer, events: list, stop: tuple[str, ...] = (), max_tokens: int = 100) -> Sequence:
    prompt = tuple(tokenizer.encode("Say: ", add_special_tokens=False))
    request = GenerationRequest("r", prompt, max_tokens=max_tokens, stop=stop, method=Method.NGRAM)
    seq = Sequence(
        request=request,
        on_event=events.append,
        handle=Handle("r", lambda: None),
        method=Method.NGRAM,
        k=4,
        max_tokens=max_tokens,
        sampling=GREEDY,
        seed=0,
        identity=RequestIdentity("r", "tiny", Method.NGRAM, "", ""),
        timing=RequestTiming(arrival=time.monotonic()),
        stats=SpecDecodeStats(4),
        tokens=list(prompt),
        prompt_len=len(prompt),
    )
    seq.detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    return seq


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_accepted_tokens_are_delivered_by_the_next_flush(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events)
    first, second = _ids(tokenizer, "The quick"), _ids(tokenizer, " brown fox")
    output.accept(seq, first)
    assert events == [] and seq.tokens[-len(first) :] == first and seq.completion_tokens == len(first)
    output.accept(seq, second)  # a flush was delayed: both passes go out in one chunk
    output.flush()
    assert events == [TokenChunk("r", tuple(first + second), "The quick brown fox")]
    output.flush()  # nothing new
    assert len(events) == 1 and not seq.finished


def test_a_stop_string_found_by_the_flush_takes_back_the_tokens_after_it(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events, stop=("fox",))
    kept, after = _ids(tokenizer, "The quick brown fox"), _ids(tokenizer, " jumps over")
    prompt_len = len(seq.tokens)
    output.accept(seq, kept + after)  # one pass: the stop string, then more accepted drafts
    assert not seq.finished
    output.flush()
    chunk, final = events
    assert chunk == TokenChunk("r", tuple(kept), "The quick brown ")
    assert isinstance(final, FinalResult) and final.finish_reason is FinishReason.STOP_SEQUENCE
    assert final.completion_tokens == len(kept) == seq.completion_tokens
    assert seq.tokens[prompt_len:] == kept


def test_eos_and_length_end_the_request_at_once_and_a_stop_string_before_them_wins(tokenizer) -> None:
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    text = _ids(tokenizer, "The quick brown fox")

    events: list = []
    seq = _sequence(tokenizer, events)
    output.accept(seq, text + [EOS, 5, 6])  # no flush needed: EOS ends it during accept()
    chunk, final = events
    assert chunk.token_ids == tuple(text + [EOS]) and chunk.text == "The quick brown fox"
    assert final.finish_reason is FinishReason.EOS and final.completion_tokens == len(text) + 1

    events = []
    seq = _sequence(tokenizer, events, max_tokens=3)
    output.accept(seq, text)
    assert [type(e) for e in events] == [TokenChunk, FinalResult]
    assert events[0].token_ids == tuple(text[:3]) and events[1].finish_reason is FinishReason.LENGTH

    events = []
    seq = _sequence(tokenizer, events, stop=("quick",))
    output.accept(seq, text + [EOS])  # the stop string came first: it ended the request
    chunk, final = events
    assert chunk.token_ids == tuple(_ids(tokenizer, "The quick")) and chunk.text == "The "
    assert final.finish_reason is FinishReason.STOP_SEQUENCE and final.completion_tokens == len(
        chunk.token_ids
    )


def test_finish_delivers_unflushed_tokens_before_the_final_result(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events, stop=("fox jumps",))
    output.accept(seq, _ids(tokenizer, "The quick brown fox"))
    output.finish(seq, FinishReason.CANCELLED)  # e.g. cancelled before the next pass
    chunk, final = events
    # Everything accepted goes out, the text held back as a possible stop string included.
    assert (
        chunk.token_ids == tuple(_ids(tokenizer, "The quick brown fox"))
        and chunk.text == "The quick brown fox"
    )
    assert final.finish_reason is FinishReason.CANCELLED and final.completion_tokens == len(chunk.token_ids)
    output.flush()
    assert len(events) == 2


def test_a_failing_detokenizer_fails_its_request_alone(tokenizer) -> None:
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    bad_events: list = []
    good_events: list = []
    bad, good = _sequence(tokenizer, bad_events), _sequence(tokenizer, good_events)

    def broken(token_id: int) -> bool:
        raise ValueError("broken detokenizer")

    bad.detok.add_token = broken
    output.accept(bad, [5, 6])
    output.accept(good, _ids(tokenizer, "The quick"))
    output.flush()
    assert [type(e) for e in bad_events] == [FinalResult]
    assert bad_events[0].finish_reason is FinishReason.ERROR and "broken detokenizer" in bad_events[0].error
    assert (
        bad_events[0].completion_tokens == 0 == bad.completion_tokens
    )  # what was not delivered is not counted
    assert bad.tokens == list(bad.request.prompt_token_ids)
    assert (
        good_events == [TokenChunk("r", tuple(_ids(tokenizer, "The quick")), "The quick")]
        and not good.finished
    )


def test_a_failing_callback_gets_the_final_result_and_nothing_else(tokenizer) -> None:
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    events: list = []

    def callback(event) -> None:
        events.append(event)
        if isinstance(event, TokenChunk):
            raise RuntimeError("client went away")

    seq = _sequence(tokenizer, [], stop=("fox jumps",))
    seq.on_event = callback
    output.accept(seq, _ids(tokenizer, "The quick brown fox"))  # "fox" is held back: a possible stop string
    output.flush()
    chunk, final = events
    assert chunk.text == "The quick brown " and final.finish_reason is FinishReason.ERROR
    assert "client went away" in final.error


# ---- provenance: which delivered tokens were accepted drafts ---------------------------


def _accounted(events: list) -> int:
    """Accepted drafts the events account for: set mask bits plus cut drafts."""
    chunks = [e for e in events if isinstance(e, TokenChunk)]
    assert all(c.draft_mask >> len(c.token_ids) == 0 for c in chunks), "mask bits past the tokens"
    return sum(c.draft_mask.bit_count() + c.cut_drafts for c in chunks)


def test_coalesced_passes_keep_each_tokens_provenance(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events)
    first, second = _ids(tokenizer, "The quick"), _ids(tokenizer, " brown fox jumps")
    output.emit(seq, first[:1])  # the prefill's token: the target's own
    output.accept(seq, first[1:], drafts=0)
    output.accept(seq, second, drafts=len(second) - 1)  # all drafts accepted, then the bonus
    output.flush()  # both passes in one chunk
    prefill, chunk = events
    assert prefill.draft_mask == 0 and prefill.token_ids == (first[0],)
    assert chunk.token_ids == tuple(first[1:] + second)
    flags = [bool(chunk.draft_mask >> i & 1) for i in range(len(chunk.token_ids))]
    assert flags == [False] * len(first[1:]) + [True] * (len(second) - 1) + [False]
    assert chunk.cut_drafts == 0


def test_a_stop_string_cutting_a_run_of_drafts_counts_the_cut_ones(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events, stop=("fox",))
    kept, after = _ids(tokenizer, "The quick brown fox"), _ids(tokenizer, " jumps over")
    tokens = kept + after
    output.accept(seq, tokens, drafts=len(tokens) - 1)  # the stop string inside the accepted drafts
    output.flush()
    chunk, final = events
    assert chunk.token_ids == tuple(kept) and chunk.draft_mask == (1 << len(kept)) - 1
    # The drafts after the stop string are cut; the bonus token was no draft.
    assert chunk.cut_drafts == len(after) - 1
    assert _accounted(events) == len(tokens) - 1
    assert final.finish_reason is FinishReason.STOP_SEQUENCE


def test_eos_among_the_drafts_cuts_the_ones_after_it(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events)
    text = _ids(tokenizer, "The quick")
    output.accept(seq, text + [EOS, 5, 6, 7], drafts=len(text) + 3)  # EOS is an accepted draft
    chunk, final = events
    assert chunk.token_ids == tuple(text + [EOS]) and chunk.draft_mask == (1 << (len(text) + 1)) - 1
    assert chunk.cut_drafts == 2  # 5 and 6; 7 was the target's token
    assert final.finish_reason is FinishReason.EOS


def test_a_stop_found_while_a_pass_runs_holds_its_chunk_until_that_pass_is_counted(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events, stop=("fox",))
    kept, after = _ids(tokenizer, "The quick brown fox"), _ids(tokenizer, " jumps")
    output.accept(seq, kept + after, drafts=len(kept))  # the stop string's token is the last draft
    output.flush(hold_finals=True)  # the next pass runs meanwhile
    assert events == [] and seq.finished
    seq.stats.record_pass(3, 2)  # that pass, as the scheduler counts it: 2 accepted drafts
    output.cut(seq, 2)
    output.deliver_held()
    chunk, final = events
    assert chunk.token_ids == tuple(kept) and chunk.text == "The quick brown "
    assert chunk.draft_mask == (1 << len(kept)) - 1
    assert chunk.cut_drafts == 2 + 0  # the pass's drafts; after the stop only the bonus token
    assert final.finish_reason is FinishReason.STOP_SEQUENCE and seq.timing.first_token is not None


def test_cut_drafts_after_the_last_chunk_get_a_chunk_of_their_own(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events)
    output.accept(seq, _ids(tokenizer, "The quick"), drafts=1)
    output.flush(hold_finals=True)
    output.cut(seq, 3)  # e.g. the drafter failed while the pass ran: counted, not delivered
    output.finish(seq, FinishReason.ERROR, "drafter failed")
    chunk, cut_only, final = events
    assert chunk.draft_mask == 1 and chunk.cut_drafts == 0
    assert cut_only == TokenChunk("r", (), "", 0, 3)
    assert final.finish_reason is FinishReason.ERROR and _accounted(events) == 4


def test_tokens_a_failed_detokenizer_never_delivered_are_cut(tokenizer) -> None:
    events: list = []
    output = OutputProcessor(frozenset({EOS}), max_context=1000)
    seq = _sequence(tokenizer, events)

    def broken(token_id: int) -> bool:
        raise ValueError("broken detokenizer")

    seq.detok.add_token = broken
    output.accept(seq, [5, 6, 7], drafts=2)
    output.flush()
    cut_only, final = events
    assert cut_only == TokenChunk("r", (), "", 0, 2) and final.finish_reason is FinishReason.ERROR
