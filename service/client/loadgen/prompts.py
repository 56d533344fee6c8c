"""Prompt sets: built-in (the project's benchmark prompts) or a JSONL file.

One JSON object per line, either form, with an optional per-prompt max_tokens:

    {"text": "Summarize: ...", "max_tokens": 64}
    {"messages": [{"role": "user", "content": "Hello"}]}

Blank lines are skipped. A line that is not one of these is an error naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service.client.loadgen.builtin_prompts import KINDS

BUILTIN_PREFIX = "builtin:"
# Every built-in set by the name --prompts takes (builtin:<name>).
BUILTIN_SETS = {**KINDS, "all": [p for kind in KINDS.values() for p in kind]}


class PromptSetError(ValueError):
    """A prompt set that cannot be used; the message names the set and, for a file, the line."""


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text and messages is set; messages are (role, content) pairs."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_tokens: int | None = None


def load_prompts(spec: str) -> list[Prompt]:
    """`builtin:<name>` (sent as one user chat message each, as the in-process benchmarks
    do) or the path of a JSONL file."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_SETS:
            raise PromptSetError(
                f"unknown built-in prompt set {name!r}; choose one of "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)
            )
        return [Prompt(messages=(("user", text),)) for text in BUILTIN_SETS[name]]
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"cannot read prompt file {spec}: {exc}") from exc
    prompts = [
        _parse_line(line, f"{spec}:{number}") for number, line in enumerate(lines, start=1) if line.strip()
    ]
    if not prompts:
        raise PromptSetError(f"prompt file {spec} holds no prompts")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{where}: not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise PromptSetError(f"{where}: expected a JSON object with 'text' or 'messages'")
    unknown = set(item) - {"text", "messages", "max_tokens"}
    if unknown:
        raise PromptSetError(
            f"{where}: unknown field(s) {sorted(unknown)}; "
            "expected 'text' or 'messages', and optionally 'max_tokens'"
        )
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise PromptSetError(f"{where}: max_tokens must be an integer >= 1, got {max_tokens!r}")
    if ("text" in item) == ("messages" in item):
        raise PromptSetError(f"{where}: exactly one of 'text' and 'messages' is required")
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"]:
            raise PromptSetError(f"{where}: text must be a non-empty string")
        return Prompt(text=item["text"], max_tokens=max_tokens)
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise PromptSetError(f"{where}: messages must be a non-empty list")
    pairs = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise PromptSetError(
                f"{where}: messages[{index}] must be an object with string 'role' and 'content'"
            )
        pairs.append((message["role"], message["content"]))
    return Prompt(messages=tuple(pairs), max_tokens=max_tokens)
