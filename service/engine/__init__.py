"""The speculative-decoding engine (see api.py for the public types and threading contract).

The plain-data API (api.py) and EngineConfig import no torch, so the gRPC layer and the
client can use them without paying for torch; `Engine` itself, which does, is imported on
first use of the name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.engine.api import (
    EngineError,
    EngineInfo,
    EngineStoppedError,
    Event,
    EventCallback,
    FinalResult,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Method,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TokenChunk,
)
from service.engine.config import EngineConfig
from service.engine.pass_record import PassObserver, PassRecord

if TYPE_CHECKING:
    from service.engine.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from service.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineInfo",
    "EngineStoppedError",
    "Event",
    "EventCallback",
    "FinalResult",
    "FinishReason",
    "GenerationRequest",
    "InvalidRequestError",
    "Method",
    "PassObserver",
    "PassRecord",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenChunk",
]
