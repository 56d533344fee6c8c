"""Turning accepted tokens into events: stop conditions, text, chunks and the final result."""

from __future__ import annotations

import time

import structlog

from service.engine.api import FinalResult, FinishReason, TokenChunk
from service.engine.sequence import Sequence
from service.engine.stats import to_proto

log = structlog.get_logger(__name__)


class OutputProcessor:
    """Appends a pass's tokens to a sequence, applies the stop conditions, delivers events."""

    def __init__(self, eos_ids: frozenset[int], max_context: int) -> None:
        self.eos_ids = eos_ids
        self.max_context = max_context

    def emit(self, seq: Sequence, new_tokens: list[int]) -> None:
        """Accepted tokens of one pass, in order. May finish the request (then delivers the
        final chunk and the FinalResult)."""
        detok = seq.detok
        assert detok is not None
        tokens, eos_ids = seq.tokens, self.eos_ids
        # The length limits end the request at the room-th token of this pass.
        room = min(seq.max_tokens - seq.completion_tokens, self.max_context - len(tokens))
        if new_tokens and seq.timing.first_token is None:
            seq.timing.first_token = time.monotonic()
        count = 0
        reason: FinishReason | None = None
        for tok in new_tokens:
            tokens.append(tok)
            count += 1
            if tok in eos_ids:
                reason = FinishReason.EOS  # the EOS id is reported, its text is not
            elif detok.add_token(tok):
                reason = FinishReason.STOP_SEQUENCE
            elif count >= room:
                reason = FinishReason.LENGTH
            if reason is not None:
                break  # tokens after a stop condition are dropped
        seq.completion_tokens += count
        text = detok.take_text(final=reason is not None)
        if count or text:
            self.send(seq, TokenChunk(seq.request_id, tuple(new_tokens[:count]), text))
        if reason is not None:
            self.finish(seq, reason)

    def send(self, seq: Sequence, event: TokenChunk | FinalResult) -> None:
        """Calls the submitter's callback; a failing callback fails its request only."""
        try:
            seq.on_event(event)
        except Exception as exc:  # noqa: BLE001 - the callback is foreign code
            log.warning("event_callback_failed", request_id=seq.request_id, error=repr(exc))
            if isinstance(event, TokenChunk) and not seq.finished:
                self.finish(seq, FinishReason.ERROR, f"event callback failed: {exc!r}")

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Ends a request (once) and delivers its FinalResult with the work done so far."""
        if seq.finished:
            return
        seq.finish_reason, seq.error = reason, error
        seq.timing.finished = time.monotonic()
        metrics = to_proto(
            seq.identity, seq.stats, seq.timing, seq.prompt_len, seq.completion_tokens, reason, time.time()
        )
        log.debug(
            "engine_request_done",
            request_id=seq.request_id,
            finish_reason=reason.name,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.completion_tokens,
            verify_passes=seq.stats.verify_passes,
            proposed_drafts=seq.stats.proposed_drafts,
            accepted_drafts=seq.stats.accepted_drafts,
            error=error,
        )
        self.send(seq, FinalResult(seq.request_id, reason, seq.prompt_len, seq.completion_tokens, metrics, error))
