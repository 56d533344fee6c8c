"""GenerateRequest (proto) -> engine GenerationRequest: input forms, tokenization, limits.

Checks that only the gRPC layer can make (request size, which input form, stop strings,
the server's max_tokens ceiling) live here. Sampling values, k, the drafter and the
context length are checked once, by Engine.submit, which names the same proto fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.engine.api import (
    GenerationRequest,
    InvalidRequestError,
    Method,
    SamplingParams,
)
from specdec.v1 import generation_pb2, metrics_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# A request id travels in every response, log line and metrics record; the sidecar's log
# lines show at most 128 characters of it.
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int
    max_tokens_limit: int


def check_request_id(request_id: str) -> None:
    """A caller-chosen id: printable, at most MAX_REQUEST_ID_CHARS characters ('' is fine:
    the server picks one). Raises InvalidRequestError; the message does not echo the id."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            "request_id", f"{len(request_id)} characters is longer than the limit of {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise InvalidRequestError("request_id", "must contain only printable characters")


def to_engine_request(
    request: generation_pb2.GenerateRequest,
    request_id: str,
    tokenizer: Any,
    limits: RequestLimits,
    received_at: float | None = None,
) -> GenerationRequest:
    """Validate and tokenize; raises InvalidRequestError naming the offending field.
    received_at: time.monotonic() when the server received the request."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequestError(
            "request", f"{size} bytes is larger than the limit of {limits.max_request_bytes} bytes")
    prompt = _prompt_token_ids(request, tokenizer)

    max_tokens: int | None = None
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")
        if max_tokens > limits.max_tokens_limit:
            raise InvalidRequestError(
                "max_tokens", f"must be <= {limits.max_tokens_limit}, got {max_tokens}")

    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(request.stop)}")
    for index, stop in enumerate(request.stop):
        if not stop:
            raise InvalidRequestError(f"stop[{index}]", "must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop[{index}]", f"longer than {MAX_STOP_STRING_CHARS} characters")

    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt),
        max_tokens=max_tokens,
        sampling=_sampling(request.sampling),
        stop=tuple(request.stop),
        method=_method(request.speculation.method),
        num_draft_tokens=(request.speculation.num_draft_tokens
                          if request.speculation.HasField("num_draft_tokens") else None),
        received_at=received_at,
    )


def _prompt_token_ids(request: generation_pb2.GenerateRequest, tokenizer: Any) -> list[int]:
    form = request.WhichOneof("input")
    if form is None:
        raise InvalidRequestError("input", "one of text, messages or token_ids is required")
    if form == "text":
        if not request.text:
            raise InvalidRequestError("text", "must not be empty")
        return list(tokenizer(request.text)["input_ids"])
    if form == "token_ids":
        if not request.token_ids.ids:
            raise InvalidRequestError("token_ids.ids", "must not be empty")
        return list(request.token_ids.ids)
    messages = request.messages.messages
    if not messages:
        raise InvalidRequestError("messages.messages", "at least one message is required")
    for index, message in enumerate(messages):
        if not message.role:
            raise InvalidRequestError(f"messages.messages[{index}].role", "must not be empty")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("messages", "the target model has no chat template; send text")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise InvalidRequestError("messages", f"the chat template rejected it: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sampling(params: generation_pb2.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=params.temperature if params.HasField("temperature") else defaults.temperature,
        top_p=params.top_p if params.HasField("top_p") else defaults.top_p,
        top_k=params.top_k if params.HasField("top_k") else defaults.top_k,
        seed=params.seed if params.HasField("seed") else None,
    )


def _method(value: int) -> Method | None:
    if value == metrics_pb2.SPECULATION_METHOD_UNSPECIFIED:
        return None
    try:
        return Method(value)
    except ValueError:
        raise InvalidRequestError("speculation.method", f"unknown method {value}") from None
