"""The benchmark prompts (grounded and open chat); they live in the installed package so that
`specdec-bench` offers them as built-in prompt sets."""

from service.client.loadgen.builtin_prompts import CODE, GROUNDED, KINDS, OPEN_CHAT, PASSAGE

__all__ = ["CODE", "GROUNDED", "KINDS", "OPEN_CHAT", "PASSAGE"]
