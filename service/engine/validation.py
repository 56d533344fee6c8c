"""Synchronous validation of a GenerationRequest; errors name the proto field."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from service.engine.api import EngineInfo, GenerationRequest, InvalidRequestError, Method
from service.engine.config import EngineConfig
from service.engine.speculation.row_sampling import RowSampling

_MAX_SEED = 2**64 - 1
# Temperatures below this decode greedily: logits / 1e-38 overflow float32 to inf, and the
# softmax of inf - inf is NaN (every token came out as the last vocabulary id). Above it the
# scaled logits stay finite, and the distribution is already the argmax's up to ties.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class ResolvedRequest:
    method: Method
    k: int  # 0 for Method.NONE
    max_tokens: int
    sampling: RowSampling
    seed: int


def resolve(request: GenerationRequest, config: EngineConfig, info: EngineInfo) -> ResolvedRequest:
    """Checks `request` and fills in the engine's defaults; raises InvalidRequestError."""
    prompt = request.prompt_token_ids
    if len(prompt) == 0:
        raise InvalidRequestError("input", "the prompt is empty")
    bad = [t for t in prompt if not isinstance(t, int) or t < 0 or t >= info.vocab_size]
    if bad:
        raise InvalidRequestError(
            "input", f"token id {bad[0]!r} is outside the vocabulary [0, {info.vocab_size})"
        )
    if len(prompt) >= info.max_context_tokens:
        raise InvalidRequestError(
            "input",
            f"the prompt has {len(prompt)} tokens; the context holds {info.max_context_tokens} "
            "and at least one must remain for the output",
        )

    max_tokens = config.default_max_tokens if request.max_tokens is None else request.max_tokens
    if max_tokens <= 0:
        raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")

    s = request.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0.0):
        raise InvalidRequestError(
            "sampling.temperature", f"must be a finite number >= 0, got {s.temperature}"
        )
    if not (0.0 < s.top_p <= 1.0):  # also rejects NaN
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0, got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed <= _MAX_SEED:
        raise InvalidRequestError("sampling.seed", f"must be in [0, 2^64), got {s.seed}")

    method = request.method or config.default_method
    if method not in info.methods:
        raise InvalidRequestError(
            "speculation.method", f"{method.name} is not available on this server (no draft model)"
        )
    k = config.default_num_draft_tokens if request.num_draft_tokens is None else request.num_draft_tokens
    if not 0 <= k <= config.max_num_draft_tokens:
        raise InvalidRequestError(
            "speculation.num_draft_tokens", f"must be in [0, {config.max_num_draft_tokens}], got {k}"
        )
    if method is Method.NONE:
        k = 0

    if any(not isinstance(stop, str) for stop in request.stop):
        raise InvalidRequestError("stop", "stop sequences must be strings")

    seed = secrets.randbits(63) if s.seed is None else s.seed
    temperature = 0.0 if s.temperature < GREEDY_BELOW_TEMPERATURE else s.temperature
    return ResolvedRequest(method, k, max_tokens, RowSampling(temperature, s.top_p, s.top_k), seed)
