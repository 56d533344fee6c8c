"""Planning a prefill pass: which prompt tokens of which rows, in which forwards.

A prefill pass feeds at most `budget` prompt tokens, taken from the rows still prefilling
(docs/prefill.md). Both functions here are pure: the scheduler (the target's prompts) and
the draft-model drafter (its own catch-up on the prompt) share them.
"""

from __future__ import annotations


def allocate(remaining: list[int], budget: int) -> list[int]:
    """Tokens each row prefills in this pass; `remaining` per row, oldest admission first.

    The oldest row gets up to half the budget (so it always progresses, however many short
    prompts keep arriving), then the shortest remaining prompts are served whole first (a
    short prompt behind a long one is not held for the long one's chunks), and whatever is
    left goes to the oldest row again. The total never exceeds `budget`.
    """
    if budget < 1:
        raise ValueError(f"prefill budget must be >= 1, not {budget}")
    chunks = [0] * len(remaining)
    if not remaining:
        return chunks
    left = budget
    chunks[0] = min(remaining[0], max(1, budget // 2))
    left -= chunks[0]
    for i in sorted(range(1, len(remaining)), key=lambda i: (remaining[i], i)):
        if left == 0:
            break
        chunks[i] = min(remaining[i], left)
        left -= chunks[i]
    extra = min(remaining[0] - chunks[0], left)
    chunks[0] += extra
    return chunks


def forward_groups(widths: dict[int, int]) -> list[list[int]]:
    """Splits rows {slot: tokens fed} into groups, each one forward over its slot span
    (rows padded to the group's widest): a group is split while its padding (slots of the
    span not in the group, and short rows padded to the widest) would more than double the
    tokens it feeds. Returns the groups' slots, each sorted."""
    slots = sorted(slot for slot, width in widths.items() if width > 0)
    if not slots:
        return []
    width = max(widths[s] for s in slots)
    lo, hi = slots[0], slots[-1] + 1
    fed = sum(widths[s] for s in slots)
    if len(slots) == 1 or (hi - lo) * width <= 2 * fed + 16 * (hi - lo):
        return [slots]
    wide = [s for s in slots if 2 * widths[s] > width]
    narrow = [s for s in slots if 2 * widths[s] <= width]
    if not narrow:  # similar widths in a sparse span: split the span
        wide, narrow = slots[: len(slots) // 2], slots[len(slots) // 2 :]
    return forward_groups({s: widths[s] for s in wide}) + forward_groups({s: widths[s] for s in narrow})
