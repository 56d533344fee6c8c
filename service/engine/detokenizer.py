"""Incremental detokenization with stop strings.

Text is produced with the prefix-offset technique (as in TGI/vLLM): decode a short window of
tokens before the new ones and the window including them, and emit the difference; while
the decoded text ends in U+FFFD (an incomplete UTF-8 character split across tokens), hold
it back. Stop strings are searched in the whole output text; text that could still be the
start of a stop string is held back until it is disambiguated.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token


class IncrementalDetokenizer:
    """Feeds tokens one at a time; tells the caller when a stop string appeared."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int] | tuple[int, ...], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all output text decoded so far (cut at a stop string once found)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> bool:
        """Adds one output token; returns True when a stop string now appears in the text."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
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
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            if len(tail) > len(prefix_text):
                self.text += tail[len(prefix_text) :]
                self._prefix_offset = self._read_offset = len(self._ids)
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        out = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out
