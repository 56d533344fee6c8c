"""Incremental detokenization: UTF-8 across tokens, stop strings across chunk borders."""

from __future__ import annotations

from service.engine.detokenizer import IncrementalDetokenizer


def _feed(
    tokenizer, text: str, stop: tuple[str, ...] = (), prompt: str = "Say: "
) -> tuple[list[str], bool, str]:
    """Feeds the tokens of `text` one by one; returns (released pieces, stopped, final piece)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop)
    pieces = []
    stopped = False
    for tok in tokenizer.encode(text, add_special_tokens=False):
        stopped = detok.add_token(tok)
        pieces.append(detok.take_text(final=stopped))
        if stopped:
            break
    final = "" if stopped else detok.take_text(final=True)
    return pieces, stopped, final


def test_multibyte_characters_never_split(tokenizer) -> None:
    text = "café 日本語 🙂🚀 naïve ∞"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 5  # the byte-level BPE really splits characters
    pieces, stopped, final = _feed(tokenizer, text)
    assert not stopped
    assert "".join(pieces) + final == text
    assert all("\ufffd" not in p for p in pieces)
    assert final == ""  # nothing left over once the last character completed


def test_stop_string_is_cut_and_held_back(tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    pieces, stopped, _ = _feed(tokenizer, text, stop=("jumps",))
    assert stopped
    assert "".join(pieces) == "The quick brown fox "
    # while "j", "ju", ... could still become "jumps", they were not released
    assert not any("j" in p for p in pieces)


def test_stop_string_prefix_that_diverges_is_released(tokenizer) -> None:
    pieces, stopped, final = _feed(tokenizer, "The dog sleeps.", stop=("dog runs",))
    assert not stopped
    assert "".join(pieces) + final == "The dog sleeps."
    released = ["".join(pieces[: i + 1]) for i in range(len(pieces))]
    # While the text ended in "dog" (a prefix of the stop string) it was held back ...
    assert "The " in released and not any(
        r.startswith("The dog") and not r.startswith("The dog s") for r in released
    )


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    pieces, stopped, _ = _feed(tokenizer, "print(add(1, 2))\n", stop=("2)", "add("))
    assert stopped and "".join(pieces) == "print("


def test_stop_string_inside_a_multibyte_run(tokenizer) -> None:
    pieces, stopped, _ = _feed(tokenizer, "emoji 🙂🚀✨ end", stop=("🚀",))
    assert stopped and "".join(pieces) == "emoji 🙂"


def test_held_back_prefix_is_flushed_at_the_end(tokenizer) -> None:
    pieces, stopped, final = _feed(tokenizer, "The fox", stop=("fox jumps",))
    assert not stopped
    assert "".join(pieces) == "The "
    assert final == "fox"
