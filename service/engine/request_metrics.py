"""Per-request speculative-decoding counters (docs/metrics-contract.md) and their one proto
conversion."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.engine.api import FinishReason, Method
from specdec.v1 import metrics_pb2


@dataclass
class SpecDecodeStats:
    """Counters of one request, fed once per decode pass from the host copy of the verdicts.

    k is the request's num_draft_tokens (0 for Method.NONE); it fixes the array lengths.
    """

    k: int
    verify_passes: int = 0
    draft_passes: int = 0
    proposed_drafts: int = 0
    accepted_drafts: int = 0
    accept_histogram: list[int] = field(default_factory=list)  # len k + 1
    proposed_per_position: list[int] = field(default_factory=list)  # len k
    accepted_per_position: list[int] = field(default_factory=list)  # len k

    def __post_init__(self) -> None:
        self.accept_histogram = [0] * (self.k + 1)
        self.proposed_per_position = [0] * self.k
        self.accepted_per_position = [0] * self.k

    def record_pass(self, proposed: int, accepted: int) -> None:
        """One decode pass that proposed d_s = `proposed` drafts and accepted a_s = `accepted`.

        `accepted` is the verifier's decision, whether or not a stop condition later cuts
        some of those tokens off.
        """
        if not 0 <= accepted <= proposed <= self.k:
            raise ValueError(f"bad pass: proposed={proposed} accepted={accepted} k={self.k}")
        self.verify_passes += 1
        if proposed == 0:
            return
        self.draft_passes += 1
        self.proposed_drafts += proposed
        self.accepted_drafts += accepted
        self.accept_histogram[accepted] += 1
        for i in range(proposed):
            self.proposed_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def accept_rate(self) -> float | None:
        return self.accepted_drafts / self.proposed_drafts if self.proposed_drafts else None

    @property
    def accept_length(self) -> float | None:
        if not self.verify_passes:
            return None
        return (self.accepted_drafts + self.verify_passes) / self.verify_passes


@dataclass
class RequestTiming:
    """Monotonic timestamps of one request's life (seconds)."""

    arrival: float  # the server received the request (before tokenization)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class RequestIdentity:
    request_id: str
    target_model: str
    method: Method
    draft_model: str  # "" unless method is DRAFT_MODEL
    instance_id: str


def to_proto(
    identity: RequestIdentity,
    stats: SpecDecodeStats,
    timing: RequestTiming,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: FinishReason,
    end_wall_time: float | None = None,
) -> metrics_pb2.SpeculativeMetrics:
    """The SpeculativeMetrics message: the only place the proto is filled."""
    finished = timing.finished if timing.finished is not None else time.monotonic()
    m = metrics_pb2.SpeculativeMetrics(
        request_id=identity.request_id,
        target_model=identity.target_model,
        method=identity.method.value,
        draft_model=identity.draft_model,
        num_draft_tokens=stats.k,
        instance_id=identity.instance_id,
        verify_passes=stats.verify_passes,
        draft_passes=stats.draft_passes,
        proposed_drafts=stats.proposed_drafts,
        accepted_drafts=stats.accepted_drafts,
        accept_histogram=stats.accept_histogram,
        proposed_per_position=stats.proposed_per_position,
        accepted_per_position=stats.accepted_per_position,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish_reason.value,
        queue_time_seconds=max(
            0.0, (timing.admitted if timing.admitted is not None else finished) - timing.arrival
        ),
        duration_seconds=max(0.0, finished - timing.arrival),
    )
    if stats.accept_rate is not None:
        m.accept_rate = stats.accept_rate
    if stats.accept_length is not None:
        m.accept_length = stats.accept_length
    if timing.first_token is not None:
        m.time_to_first_token_seconds = max(0.0, timing.first_token - timing.arrival)
    m.end_time.FromNanoseconds(int((end_wall_time if end_wall_time is not None else time.time()) * 1e9))
    return m
