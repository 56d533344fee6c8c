"""A Generate stream that falls behind writes what is ready as one message
(service/api/streaming.py): the tokens, text and provenance are those of the chunks it merges."""

from __future__ import annotations

import asyncio

from service.api.request_mapping import to_chunk
from service.api.streaming import merge_chunks, take_ready
from service.engine.api import FinalResult, FinishReason, TokenChunk
from specdec.v1 import metrics_pb2
from specdec_common.provenance import unpack_draft_mask

# three passes: a draft accepted then the bonus; the target's own token; two drafts, a bonus, one cut
CHUNKS = [
    TokenChunk("r", (5, 6), "ab", draft_mask=0b01),
    TokenChunk("r", (7,), "c", draft_mask=0b0),
    TokenChunk("r", (8, 9, 10), "de", draft_mask=0b011, cut_drafts=1),
]
FINAL = FinalResult("r", FinishReason.LENGTH, 6, 6, metrics_pb2.SpeculativeMetrics())


def flags(chunk: TokenChunk) -> list[bool]:
    wire = to_chunk(chunk)
    return unpack_draft_mask(wire.draft_mask, len(wire.token_ids))


def test_merged_chunks_keep_tokens_text_and_provenance_in_order() -> None:
    merged = merge_chunks(CHUNKS)
    assert merged.token_ids == (5, 6, 7, 8, 9, 10)
    assert merged.text == "abcde"
    assert flags(merged) == [flag for chunk in CHUNKS for flag in flags(chunk)]
    assert flags(merged) == [True, False, False, True, True, False]
    assert merged.cut_drafts == 1
    assert merge_chunks(CHUNKS[:1]) is CHUNKS[0]


def queued(*events) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    return queue


def test_what_is_ready_goes_out_as_one_message() -> None:
    queue = queued(*CHUNKS[1:], FINAL)
    chunk, final = take_ready(CHUNKS[0], queue)
    assert chunk.token_ids == (5, 6, 7, 8, 9, 10) and final is FINAL and queue.empty()


def test_nothing_waits_for_events_not_yet_delivered() -> None:
    queue = queued(CHUNKS[1])
    chunk, final = take_ready(CHUNKS[0], queue)
    assert chunk.token_ids == (5, 6, 7) and final is None and queue.empty()


def test_a_final_alone_has_no_chunk() -> None:
    assert take_ready(FINAL, queued()) == (None, FINAL)
