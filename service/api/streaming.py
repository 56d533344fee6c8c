"""What a Generate stream writes next: every chunk the engine has delivered for the request
and the stream has not yet written, as one message.

The engine delivers one chunk per pass (a pass's accepted tokens together). A stream that falls
behind (a slow client, a busy event loop) would otherwise write one message per pass it is
behind; it writes one message with all of them instead, so catching up costs one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.engine.api import EngineLost, Event, FinalResult, TokenChunk


def merge_chunks(chunks: Sequence[TokenChunk]) -> TokenChunk:
    """Consecutive chunks of one request as one: tokens and text in order, each chunk's draft
    mask shifted past the tokens before it, cut drafts summed."""
    if len(chunks) == 1:
        return chunks[0]
    token_ids: list[int] = []
    mask = cut = 0
    for chunk in chunks:
        mask |= chunk.draft_mask << len(token_ids)
        token_ids.extend(chunk.token_ids)
        cut += chunk.cut_drafts
    return TokenChunk(
        request_id=chunks[0].request_id,
        token_ids=tuple(token_ids),
        text="".join(chunk.text for chunk in chunks),
        draft_mask=mask,
        cut_drafts=cut,
    )


def take_ready(
    first: Event, queue: asyncio.Queue[Event]
) -> tuple[TokenChunk | None, FinalResult | EngineLost | None]:
    """`first` and the events already waiting behind it in `queue`, without waiting for more:
    their chunks merged into one (None when there are none) and the last event (FinalResult
    or EngineLost) if it is among them (nothing follows it)."""
    chunks: list[TokenChunk] = []
    event: Event | None = first
    while event is not None:
        if not isinstance(event, TokenChunk):
            return (merge_chunks(chunks) if chunks else None), event
        chunks.append(event)
        event = None if queue.empty() else queue.get_nowait()
    return merge_chunks(chunks), None
