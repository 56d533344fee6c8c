"""The engine thread's state for one request, and the handle its submitter holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.engine.api import EventCallback, FinishReason, GenerationRequest, Method
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.request_metrics import RequestIdentity, RequestTiming, SpecDecodeStats
from service.engine.speculation.sampling import RowSampling


class Handle:
    """RequestHandle: cancel() may be called from any thread, any number of times."""

    def __init__(self, request_id: str, wake: Callable[[], None]) -> None:
        self.request_id = request_id
        # A plain flag (set once, from any thread; a bool store is atomic in CPython): the
        # engine thread reads it for every running request in every pass.
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


@dataclass
class Sequence:
    """One admitted (or queued) request. Only the engine thread touches it after submit."""

    request: GenerationRequest
    on_event: EventCallback
    handle: Handle
    method: Method
    k: int  # num_draft_tokens for this request (0 for Method.NONE)
    max_tokens: int
    sampling: RowSampling
    seed: int
    identity: RequestIdentity
    timing: RequestTiming
    stats: SpecDecodeStats
    tokens: list[int]  # prompt + generated (the last one is pending: not yet in the target's cache)
    prompt_len: int
    detok: IncrementalDetokenizer | None = None  # built on the engine thread
    generator: torch.Generator | None = None  # built on the engine thread at admission
    slot: int = -1
    target_len: int = (
        0  # tokens whose KV is valid in the target's cache (while prefilling: the prompt's fed so far)
    )
    decoding: bool = False  # the prompt is all prefilled and its first token emitted: in the decode passes
    completion_tokens: int = 0
    unflushed: int = 0  # the last tokens, accepted but not yet delivered (OutputProcessor.flush)
    unflushed_drafts: int = 0  # bit i set: the i-th unflushed token is an accepted draft
    cut_drafts: int = 0  # accepted drafts never to be delivered, not yet reported in a chunk
    # The chunk a stop string ended while a pass ran: (token ids, text, draft mask), sent
    # with the FinalResult once that pass is counted.
    held_chunk: tuple[tuple[int, ...], str, int] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_drafts: int = 0  # d_s of the coming (or running) decode pass, set by its planning

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
