"""Benchmark prompts of two kinds: input-grounded (summarize, rewrite, code edit: the answer
reuses the input) and open chat. The in-process benchmarks (bench/) and specdec-bench
(as its built-in prompt sets, sent as one user chat message each) use the same texts."""

PASSAGE = (
    "The James Webb Space Telescope (JWST) is a space telescope designed to conduct infrared "
    "astronomy. Its high-resolution and high-sensitivity instruments allow it to view objects too "
    "old, distant, or faint for the Hubble Space Telescope. This enables investigations across many "
    "fields of astronomy and cosmology, such as observation of the first stars and the formation of "
    "the first galaxies, and detailed atmospheric characterization of potentially habitable exoplanets. "
    "The telescope was launched on 25 December 2021 on an Ariane 5 rocket from Kourou, French Guiana, "
    "and arrived at the Sun-Earth L2 Lagrange point in January 2022."
)
CODE = """def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax_rate
    return total


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""

GROUNDED = [
    f"Summarize the following text in three sentences, reusing its wording.\n\n{PASSAGE}",
    f"Rewrite the following text, keeping every fact and most of the wording, but in the past tense "
    f"where possible.\n\n{PASSAGE}",
    f"Rename the variable `total` to `amount` in this Python code and return the whole code.\n\n{CODE}",
]
OPEN_CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for staying focused while studying? Explain each briefly.",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
]

# The two kinds by the names the benchmarks' JSON uses.
KINDS = {"grounded": GROUNDED, "open_chat": OPEN_CHAT}
