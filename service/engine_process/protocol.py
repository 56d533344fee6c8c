"""The messages between the gRPC front end and the engine core, pickled over one pipe.

Requests are named by a key the front end assigns (an int, unique per submission), not by
request id: two clients may use the same request id at once. Events cross in batches: one
`Events` message per delivery point of the engine (Engine.add_delivery_observer, at most four
a turn) carries every event delivered since the last, never a message per token or per
request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.engine.api import EngineInfo, Event, GenerationRequest, TokenChunk
from service.engine.config import EngineConfig

# ---- front end -> core ---------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    key: int
    request: GenerationRequest


@dataclass(frozen=True)
class Cancel:
    key: int


@dataclass(frozen=True)
class Stop:
    """Drain (Engine.stop): queued requests are cancelled at once, running ones get
    `drain_timeout_s`; then the core sends Stopped and exits."""

    drain_timeout_s: float | None


# ---- core -> front end ---------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The models are loaded and the engine is started and warmed up. `config` is the
    engine's, so that the front end validates and counts requests exactly as it does."""

    info: EngineInfo
    config: EngineConfig
    tokenizer: Any  # the target's transformers tokenizer (HF fast tokenizers pickle)
    pid: int


@dataclass(frozen=True)
class StartFailed:
    """Loading or starting failed; `message` is str() of the exception, as the server would
    have logged it had it loaded the models itself."""

    error_type: str
    message: str


@dataclass(frozen=True)
class Events:
    """Every event delivered since the last delivery point, in order, each as `encode_event` wrote it."""

    items: list[tuple]


def encode_event(key: int, event: Event) -> tuple:
    """A chunk as a plain tuple (a frozen dataclass pickles about eight times slower, and the
    engine thread pickles a chunk per running request per pass); other events as they are."""
    if isinstance(event, TokenChunk):
        return (key, event.request_id, event.token_ids, event.text, event.draft_mask, event.cut_drafts)
    return (key, event)


def decode_event(item: tuple) -> tuple[int, Event]:
    if len(item) == 2:
        return item  # type: ignore[return-value]
    key, request_id, token_ids, text, draft_mask, cut_drafts = item
    return key, TokenChunk(request_id, token_ids, text, draft_mask, cut_drafts)


@dataclass(frozen=True)
class Rejected:
    """A submission the core refused. The front end validates first, so no ordinary bad
    request ends here: a disagreement between the two checks, a Submit that crossed a Stop
    (the engine is draining), or an error applying it. The client gets UNAVAILABLE."""

    key: int
    error_type: str
    message: str


@dataclass(frozen=True)
class Stopping:
    """The core got its first Stop (from any front end) and drains: a front end that did not
    ask stops taking calls and drains its own (--front-ends)."""


@dataclass(frozen=True)
class Stopped:
    """The engine has stopped; every event was sent before this. The core exits next."""


ToCore = Submit | Cancel | Stop
ToFront = Ready | StartFailed | Events | Rejected | Stopping | Stopped


def exited_text(code: int | None) -> str:
    """How the front end names the core's exit; the code is None in a front end that did not
    start the core (--front-ends), which cannot read it."""
    if code is None:
        return "the engine process exited"
    return f"the engine process exited with code {code}"
