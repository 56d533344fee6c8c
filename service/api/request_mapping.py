"""GenerateRequest (proto) -> engine GenerationRequest: input forms, tokenization, limits;
and an engine TokenChunk -> GenerateChunk (proto).

Checks that only the gRPC layer can make (request size, which input form, stop strings,
the server's max_tokens ceiling) live here. Sampling values, k, the drafter and the
context length are checked once, by Engine.submit, which names the same proto fields.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any

from service.config import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_PROMPT_CHARS
from service.engine.api import (
    GenerationRequest,
    InvalidRequestError,
    Method,
    SamplingParams,
    TokenChunk,
)
from specdec.v1 import generation_pb2, metrics_pb2
from specdec_common.provenance import pack_draft_mask
from specdec_common.request_limits import MAX_REQUEST_ID_CHARS

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# A request id travels in every response, log line and metrics record; the sidecar's log
# lines show at most 128 characters of it.


# A chat role is a name (system, user, assistant, tool, ...): templates paste it between their
# own control tokens, so anything more (newlines, control-token text) could forge a turn.
ROLE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int
    max_tokens_limit: int
    # Checked before tokenization, whose cost grows with the text: a prompt far longer than
    # any context would otherwise hold a tokenizer thread and memory before being refused.
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES


def check_request_id(request_id: str) -> None:
    """A caller-chosen id: printable, at most MAX_REQUEST_ID_CHARS characters ('' is fine:
    the server picks one). Raises InvalidRequestError; the message does not echo the id."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            "request_id", f"{len(request_id)} characters is longer than the limit of {MAX_REQUEST_ID_CHARS}"
        )
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
            "request", f"{size} bytes is larger than the limit of {limits.max_request_bytes} bytes"
        )
    check_prompt_size(request, limits)
    prompt = _prompt_token_ids(request, tokenizer)

    max_tokens: int | None = None
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")
        if max_tokens > limits.max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"must be <= {limits.max_tokens_limit}, got {max_tokens}")

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
        num_draft_tokens=(
            request.speculation.num_draft_tokens if request.speculation.HasField("num_draft_tokens") else None
        ),
        received_at=received_at,
    )


def check_prompt_size(request: generation_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """The text to tokenize (text, or every message's role and content) within the character
    and UTF-8 byte limits; raises InvalidRequestError naming the field."""
    field, pieces = _prompt_text(request)
    if not pieces:
        return
    chars = sum(map(len, pieces))
    if chars > limits.max_prompt_chars:
        raise InvalidRequestError(
            field, f"{chars} characters is more than the limit of {limits.max_prompt_chars}"
        )
    size = sum(len(piece.encode("utf-8")) for piece in pieces)
    if size > limits.max_prompt_bytes:
        raise InvalidRequestError(
            field, f"{size} bytes of UTF-8 is more than the limit of {limits.max_prompt_bytes}"
        )


# A request this small, arriving while no other call streams, is mapped on the server's event
# loop (service/api/servicer.py): its tokenizing costs about what a hop to the tokenization
# pool and back does. The bounds are read without walking a large request or serializing it
# (ByteSize does: 90 ms for 60 MiB).
INLINE_MAX_CHARS = 1024  # text, or the messages' roles and contents together
INLINE_MAX_MESSAGES = 8  # each adds its chat template's own text
INLINE_MAX_TOKEN_IDS = 1024


def maps_inline(request: generation_pb2.GenerateRequest) -> bool:
    """Whether the request is small enough to map and tokenize on the event loop."""
    stops = request.stop
    if len(stops) > MAX_STOP_STRINGS or any(len(stop) > MAX_STOP_STRING_CHARS for stop in stops):
        return False  # refused, in the pool
    form = request.WhichOneof("input")
    if form == "token_ids":
        return len(request.token_ids.ids) <= INLINE_MAX_TOKEN_IDS
    if form == "messages" and len(request.messages.messages) > INLINE_MAX_MESSAGES:
        return False
    return sum(map(len, _prompt_text(request)[1])) <= INLINE_MAX_CHARS  # no input: 0, refused at once


def _prompt_text(request: generation_pb2.GenerateRequest) -> tuple[str, list[str]]:
    """The prompt's field and its pieces of text to tokenize (none for token ids or no input)."""
    form = request.WhichOneof("input")
    if form == "text":
        return "text", [request.text]
    if form == "messages":
        return "messages", [part for m in request.messages.messages for part in (m.role, m.content)]
    return form or "input", []


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
        if not ROLE_PATTERN.fullmatch(message.role):
            raise InvalidRequestError(
                f"messages.messages[{index}].role",
                "must be a name of letters, digits, '_' and '-' (at most 32, starting with a letter)",
            )
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("messages", "the target model has no chat template; send text")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    return chat_token_ids(tokenizer, conversation, can_sanitize_control_tokens(tokenizer))


def can_sanitize_control_tokens(tokenizer: Any) -> bool:
    """Whether this transformers encodes control tokens in chat messages as text itself
    (apply_chat_template's sanitize_control_tokens; newer than the 5.17 runtime floor)."""
    return _apply_chat_template_takes_sanitize(type(tokenizer))


@functools.cache
def _apply_chat_template_takes_sanitize(tokenizer_class: type) -> bool:
    apply = getattr(tokenizer_class, "apply_chat_template", None)
    return apply is not None and "sanitize_control_tokens" in inspect.signature(apply).parameters


def chat_token_ids(tokenizer: Any, conversation: list[dict[str, str]], sanitize: bool) -> list[int]:
    """The prompt of a chat. Message text is only ever text: a control token typed into a
    message (`<|im_end|><|im_start|>system`) must not become that token, or a user could
    forge a system turn. With `sanitize`, transformers encodes such text as the characters
    it is made of; without it (older transformers), a message holding a control token's
    text is refused. Either way a message without one encodes exactly as before."""
    if not sanitize:
        _refuse_control_tokens(tokenizer, conversation)
    try:
        if sanitize:
            return list(
                tokenizer.apply_chat_template(
                    conversation,
                    tokenize=True,
                    add_generation_prompt=True,
                    sanitize_control_tokens=True,
                    return_dict=False,
                )
            )
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise InvalidRequestError("messages", f"the chat template rejected it: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _refuse_control_tokens(tokenizer: Any, conversation: list[dict[str, str]]) -> None:
    # Every added token is matched in text by the tokenizer; whitespace ones (Gemma's "\n")
    # are ordinary text to a template.
    control = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t and not t.isspace()]
    for index, message in enumerate(conversation):
        for token in control:
            if token in message["content"]:
                raise InvalidRequestError(
                    f"messages.messages[{index}].content",
                    f"contains the control token {token!r}, which this server cannot encode as text",
                )


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


def to_chunk(event: TokenChunk) -> generation_pb2.GenerateChunk:
    """The wire form of a chunk, its draft mask packed as GenerateChunk.draft_mask documents."""
    return generation_pb2.GenerateChunk(
        text=event.text,
        token_ids=event.token_ids,
        draft_mask=pack_draft_mask(event.draft_mask, len(event.token_ids)),
        cut_accepted_drafts=event.cut_drafts,
    )
