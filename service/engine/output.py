"""Turning accepted tokens into events: stop conditions, text, chunks and the final result.

A pass's tokens reach the request in two steps. accept() runs right after the pass's
synchronisation: it appends the tokens and applies the conditions the next pass's layout
depends on (EOS and the length limits), which cost a comparison per token. flush() does
the rest (detokenising, stop strings, the chunk event) and is called by the scheduler
while the device runs the next pass, off the path between two passes, where the GPU would
wait for it (docs/engine.md, "A step"). A stop string is therefore found
one pass late: the row runs one more pass whose tokens are dropped, and the tokens of its
own pass after the stop string are taken back. That pass still counts in the request's
metrics (the contract counts every pass that ran), so a request that ends during such a
flush has its FinalResult held until the scheduler has recorded the pass
(flush(hold_finals=True), then deliver_held()). Text and events are the same as if every
token had been detokenised at once; finish() flushes first, so a request's chunks always
precede its FinalResult.

Provenance: every delivered token is marked as an accepted draft or a token of the target's
own (TokenChunk.draft_mask), and every accepted draft the request will never deliver (cut by
a stop condition, or in a pass that ran while the request ended) is counted in some chunk's
cut_drafts, so that over a request the set bits plus the cut drafts equal the metrics'
accepted_drafts. The chunk in which a flush found a stop string while a pass runs is held
with the FinalResult: that pass's accepted drafts are cut too, and they travel in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from service.engine.api import FinalResult, FinishReason, TokenChunk
from service.engine.request_metrics import to_proto
from service.engine.sequence import Sequence

log = structlog.get_logger(__name__)


class OutputProcessor:
    """Appends a pass's tokens to a sequence, applies the stop conditions, delivers events."""

    def __init__(self, eos_ids: frozenset[int], max_context: int) -> None:
        self.eos_ids = eos_ids
        self.max_context = max_context
        self._unflushed: list[Sequence] = []  # sequences with accepted tokens not yet sent
        self._holding = False  # finish() holds FinalResults back (a pass is running)
        self._held: list[Sequence] = []  # finished, FinalResult not yet delivered
        self.delivery_observers: list[Callable[[], None]] = []  # Engine.add_delivery_observer

    def delivered(self) -> None:
        """The events delivered so far may go out as one batch now (Engine.add_delivery_observer)."""
        for observer in self.delivery_observers:
            try:
                observer()
            except Exception:  # noqa: BLE001 - an observer must not stop the engine
                log.exception("delivery_observer_failed")

    def emit(self, seq: Sequence, new_tokens: list[int]) -> None:
        """accept() and flush() for one sequence, tokens of the target's own (the prefill's):
        its events are delivered now."""
        self.accept(seq, new_tokens)
        if not seq.finished:
            self._flush_one(seq, final=False)

    def accept(self, seq: Sequence, new_tokens: list[int], drafts: int = 0) -> None:
        """Accepted tokens of one pass, in order, the first `drafts` of them accepted drafts
        (the last one the target's own): appended to the sequence; EOS and the length limits
        end the request here (delivering its events), anything else is delivered by the next
        flush()."""
        tokens, eos_ids = seq.tokens, self.eos_ids
        # The length limits end the request at the room-th token of this pass.
        room = min(seq.max_tokens - seq.completion_tokens, self.max_context - len(tokens))
        count = 0
        reason: FinishReason | None = None
        for tok in new_tokens:
            tokens.append(tok)
            count += 1
            if tok in eos_ids:
                reason = FinishReason.EOS
            elif count >= room:
                reason = FinishReason.LENGTH
            if reason is not None:
                break  # tokens after a stop condition are dropped
        kept_drafts = min(drafts, count)
        seq.cut_drafts += drafts - kept_drafts  # accepted drafts after a stop condition
        if count:
            seq.completion_tokens += count
            if not seq.unflushed:
                self._unflushed.append(seq)
            # Bit i of unflushed_drafts is the i-th unflushed token: these drafts come first.
            seq.unflushed_drafts |= ((1 << kept_drafts) - 1) << seq.unflushed
            seq.unflushed += count
        if reason is not None:
            self.finish(seq, reason)

    def flush(self, hold_finals: bool = False) -> None:
        """Delivers every accepted token not delivered yet. A stop string found here ends its
        request (STOP_SEQUENCE); a failure fails that request alone. hold_finals: a pass is
        running for these requests, so one that ends here gets its FinalResult only from
        deliver_held(), once that pass is in its metrics."""
        pending, self._unflushed = self._unflushed, []
        self._holding = hold_finals
        try:
            for seq in pending:
                if seq.unflushed and not seq.finished:
                    try:
                        self._flush_one(seq, final=False)
                    except Exception as exc:  # noqa: BLE001 - one request's host-side work
                        log.exception("flush_failed", request_id=seq.request_id)
                        self.finish(seq, FinishReason.ERROR, f"{type(exc).__name__}: {exc}", flush=False)
        finally:
            self._holding = False

    def cut(self, seq: Sequence, drafts: int) -> None:
        """A pass counted in the request's metrics whose `drafts` accepted drafts it will
        never deliver (the request ended, or failed, while the pass ran)."""
        seq.cut_drafts += drafts

    def deliver_held(self) -> None:
        """Delivers the chunks and FinalResults that flush(hold_finals=True) held back."""
        held, self._held = self._held, []
        for seq in held:
            self._deliver_final(seq)

    def _flush_one(self, seq: Sequence, final: bool) -> None:
        """Detokenises the sequence's unflushed tokens and sends them as one chunk. final:
        the request ends now (all held-back text goes out). May finish the request."""
        count, seq.unflushed = seq.unflushed, 0
        mask, seq.unflushed_drafts = seq.unflushed_drafts, 0
        detok = seq.detok
        if detok is None:  # never prefilled: nothing was accepted
            return
        start = len(seq.tokens) - count  # seq.tokens[start:] are this chunk's tokens
        try:
            new_tokens = seq.tokens[start:]
            stopped = False
            for i, tok in enumerate(new_tokens):
                if tok in self.eos_ids:
                    continue  # the EOS id is reported, its text is not (accept() ends there)
                if detok.add_token(tok):
                    stopped = True
                    drop = count - (i + 1)  # tokens after the stop string are taken back
                    if drop:
                        del seq.tokens[-drop:]
                        seq.completion_tokens -= drop
                        new_tokens = new_tokens[: i + 1]
                        seq.cut_drafts += (mask >> (i + 1)).bit_count()
                        mask &= (1 << (i + 1)) - 1
                    break
            text = detok.take_text(final=final or stopped)
        except Exception as exc:  # noqa: BLE001 - one request's host-side work
            log.exception("detokenize_failed", request_id=seq.request_id)
            seq.completion_tokens -= len(seq.tokens) - start  # never delivered: not counted either
            del seq.tokens[start:]
            seq.cut_drafts += mask.bit_count()
            self.finish(seq, FinishReason.ERROR, f"{type(exc).__name__}: {exc}", flush=False)
            return
        if stopped and self._holding:
            # The pass now running is counted for this request: its accepted drafts are cut
            # too, and go out in this chunk, before the FinalResult (deliver_held()).
            seq.held_chunk = (tuple(new_tokens), text, mask)
        elif new_tokens or text or seq.cut_drafts:
            self._send_chunk(seq, tuple(new_tokens), text, mask)
        if stopped:
            self.finish(seq, FinishReason.STOP_SEQUENCE)

    def _send_chunk(self, seq: Sequence, token_ids: tuple[int, ...], text: str, mask: int) -> None:
        """One TokenChunk, carrying the cut drafts not reported yet."""
        if token_ids and seq.timing.first_token is None:
            seq.timing.first_token = time.monotonic()
        cut, seq.cut_drafts = seq.cut_drafts, 0
        self.send(seq, TokenChunk(seq.request_id, token_ids, text, mask, cut))

    def send(self, seq: Sequence, event: TokenChunk | FinalResult) -> None:
        """Calls the submitter's callback; a failing callback fails its request only."""
        try:
            seq.on_event(event)
        except Exception as exc:  # noqa: BLE001 - the callback is foreign code
            log.warning("event_callback_failed", request_id=seq.request_id, error=repr(exc))
            if isinstance(event, TokenChunk) and not seq.finished:
                # No flush: the callback that failed gets nothing more but the FinalResult.
                self.finish(seq, FinishReason.ERROR, f"event callback failed: {exc!r}", flush=False)

    def finish(
        self, seq: Sequence, reason: FinishReason, error: str | None = None, flush: bool = True
    ) -> None:
        """Ends a request (once) and delivers its FinalResult with the work done so far.

        Its unflushed tokens go out first, with every character held back; a stop string
        among them ended the request before whatever ends it now, so that one is reported.
        flush=False: nothing more is decoded or sent before the FinalResult (the
        detokenizer or the event callback failed).
        """
        if seq.finished:
            return
        if flush and seq.detok is not None and not seq.detok.stopped:
            self._flush_one(seq, final=True)
            if seq.finished:  # a stop string in the unflushed tokens, or a failed callback
                return
        seq.finish_reason, seq.error = reason, error
        if self._holding:
            self._held.append(seq)
        else:
            self._deliver_final(seq)

    def _deliver_final(self, seq: Sequence) -> None:
        # Accepted tokens never delivered (the event callback failed) were cut as well.
        seq.cut_drafts += seq.unflushed_drafts.bit_count()
        seq.unflushed_drafts = 0
        held, seq.held_chunk = seq.held_chunk, None
        if held is not None:
            self._send_chunk(seq, *held)
        elif seq.cut_drafts:  # a chunk of its own: every token was delivered before the cut
            self._send_chunk(seq, (), "", 0)
        reason, error = seq.finish_reason, seq.error
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
        self.send(
            seq, FinalResult(seq.request_id, reason, seq.prompt_len, seq.completion_tokens, metrics, error)
        )
