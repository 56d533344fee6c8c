"""The speculative-decoding engine (see api.py for the public types and threading contract)."""

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
from service.engine.engine import Engine

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
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenChunk",
]
