"""The engine's public API: what the gRPC layer (or a test) submits and receives.

Thread model: `Engine.submit` and `RequestHandle.cancel` may be called from any thread;
events are delivered by calling the submitter's `on_event` callback on the engine thread
(for `Engine`) or on the reader thread of `service.engine_process.client.EngineProcess`, which
offers the same interface with the engine in a child process; either way callbacks must be
quick and non-blocking (e.g. `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from specdec.v1 import metrics_pb2


class Method(enum.Enum):
    """Drafter choice; values are the proto enum's."""

    NONE = metrics_pb2.SPECULATION_METHOD_NONE
    NGRAM = metrics_pb2.SPECULATION_METHOD_NGRAM
    DRAFT_MODEL = metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL


class FinishReason(enum.Enum):
    """Why a request ended; values are the proto enum's."""

    EOS = metrics_pb2.FINISH_REASON_EOS
    STOP_SEQUENCE = metrics_pb2.FINISH_REASON_STOP_SEQUENCE
    LENGTH = metrics_pb2.FINISH_REASON_LENGTH
    CANCELLED = metrics_pb2.FINISH_REASON_CANCELLED
    ERROR = metrics_pb2.FINISH_REASON_ERROR


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 disables top-k; seed None draws a fresh seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One request, already tokenized. None fields take the engine's defaults."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    method: Method | None = None
    num_draft_tokens: int | None = None
    # time.monotonic() when the server received the request, before tokenizing it: the
    # request's timings start there. None: at Engine.submit.
    received_at: float | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Tokens accepted in one pass (possibly several), with the text they complete.

    `text` never ends inside a UTF-8 character and never contains (part of) a stop string
    that ended the request; text held back waits for a later chunk.

    Provenance: bit i of `draft_mask` is set when token_ids[i] is an accepted draft, clear
    when it is the target's own token (the prefill's, or a decode pass's bonus or correction
    token). `cut_drafts` counts accepted drafts that are in the request's metrics but will
    never be delivered (docs/metrics-contract.md, "Which tokens were drafts"), since the
    previous chunk. Over a request, the set bits plus the cut drafts equal accepted_drafts.
    A chunk may carry cut drafts and no tokens.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    draft_mask: int = 0
    cut_drafts: int = 0


@dataclass(frozen=True)
class FinalResult:
    """The last event of every admitted request, whatever the reason it ended."""

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    metrics: metrics_pb2.SpeculativeMetrics
    error: str | None = None  # set when finish_reason is ERROR


@dataclass(frozen=True)
class EngineLost:
    """The last event of a request the engine can no longer finish because the engine itself
    is gone (service/engine_process: its process exited): there is no result and no metrics
    record; the request may be retried elsewhere. The in-thread Engine never sends it."""

    request_id: str
    reason: str


Event = TokenChunk | FinalResult | EngineLost
EventCallback = Callable[[Event], None]


class EngineError(Exception):
    """Base class of the errors `submit` raises."""


class InvalidRequestError(EngineError):
    """The request is malformed; `field` names the offending field (proto field names)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class QueueFullError(EngineError):
    """The admission queue is full (maps to RESOURCE_EXHAUSTED)."""


class EngineStoppedError(EngineError):
    """The engine is draining or stopped and takes no new work (maps to UNAVAILABLE)."""


class RequestHandle(Protocol):
    request_id: str

    def cancel(self) -> None:
        """Ask the engine to stop this request; it ends with FinishReason.CANCELLED."""


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves (for GetServerInfo and logs)."""

    target_model: str
    draft_model: str  # "" when there is no draft model
    device: str
    dtype: str
    max_batch_size: int
    default_method: Method
    default_num_draft_tokens: int
    max_num_draft_tokens: int
    max_context_tokens: int  # prompt + completion tokens of one request
    methods: tuple[Method, ...]  # the methods this engine accepts
    vocab_size: int
    instance_id: str
