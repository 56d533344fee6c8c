"""Incremental detokenization with stop strings.

Text is produced with the prefix-offset technique (as in TGI/vLLM): decode a short window of
tokens before the new ones and the window including them, and emit the difference; while
the decoded text ends in U+FFFD (an incomplete UTF-8 character split across tokens), hold
it back. Stop strings are searched in the whole output text; text that could still be the
start of a stop string is held back until it is disambiguated.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token
_MAX_CACHED_TOKENS = 1 << 18  # single-token texts kept per tokenizer (bounded by the vocabulary)


def _backend_decoder(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """The Rust tokenizer's own decode, when it is exactly what `tokenizer.decode(ids,
    skip_special_tokens=True, clean_up_tokenization_spaces=False)` computes: transformers'
    fast-tokenizer base classes forward to it and add only Python overhead (argument
    conversion, several calls deep), most of a decode's cost. A subclass that overrides
    decode or _decode keeps the full path."""
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer) or type(tokenizer).decode is not PreTrainedTokenizerBase.decode:
        return None
    forwarding = []  # the base classes' _decode: backend decode, then no clean-up when asked for none
    for module, name in (
        ("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),  # transformers 5
        ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast"),
    ):  # transformers 4
        try:
            forwarding.append(getattr(importlib.import_module(module), name)._decode)
        except (ImportError, AttributeError):
            pass
    if type(tokenizer)._decode not in forwarding:
        return None
    return functools.partial(backend.decode, skip_special_tokens=True)


class TokenTexts:
    """Decoding for one tokenizer, shareable by its requests (one thread): the fastest exact
    decode, and a cache of single-token texts (a pure function of the id)."""

    def __init__(self, tokenizer: Any) -> None:
        fast = _backend_decoder(tokenizer)
        if fast is None:

            def fast(ids: list[int]) -> str:
                return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        self.decode: Callable[[list[int]], str] = fast
        self._single: dict[int, str] = {}

    def single(self, token_id: int) -> str:
        text = self._single.get(token_id)
        if text is None:
            text = self.decode([token_id])
            if len(self._single) < _MAX_CACHED_TOKENS:
                self._single[token_id] = text
        return text


class IncrementalDetokenizer:
    """Feeds tokens one at a time; tells the caller when a stop string appeared."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int] | tuple[int, ...],
        stop: tuple[str, ...],
        texts: TokenTexts | None = None,
    ) -> None:
        self._texts = texts if texts is not None else TokenTexts(tokenizer)
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all output text decoded so far (cut at a stop string once found)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._texts.decode(ids)

    def _prefix_text(self) -> str:
        """The decoded window [prefix_offset, read_offset). In the steady state it is the one
        token added by the previous step, whose text is cached, so a step decodes once."""
        if self._read_offset - self._prefix_offset == 1:
            return self._texts.single(self._ids[self._prefix_offset])
        return self._decode(self._ids[self._prefix_offset : self._read_offset])

    def add_token(self, token_id: int) -> bool:
        """Adds one output token; returns True when a stop string now appears in the text."""
        ids = self._ids
        ids.append(token_id)
        prefix_text = self._prefix_text()
        new_text = self._texts.decode(ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return False  # nothing complete yet (e.g. half a UTF-8 character): hold back
        start = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window short: only the last few tokens matter as decoding context.
        if self._prefix_offset > 64:
            drop = self._prefix_offset
            self._ids = self._ids[drop:]
            self._prefix_offset -= drop
            self._read_offset -= drop
        return self._check_stop(start)

    def _check_stop(self, new_from: int) -> bool:
        if not self._stop:
            return False
        search_from = max(0, new_from - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Characters at the end of `text` that could begin a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def take_text(self, final: bool = False) -> str:
        """The text that can be released now (everything, when the request is over)."""
        if final and not self.stopped:
            # Whatever is still undecided (partial characters, stop-string prefixes) goes out.
            tail = self._decode(self._ids[self._prefix_offset :])
            prefix_text = self._prefix_text()
            if len(tail) > len(prefix_text):
                self.text += tail[len(prefix_text) :]
                self._prefix_offset = self._read_offset = len(self._ids)
        if final or self.stopped or not self._stop:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()  # the end may still begin a stop string
        out = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out
