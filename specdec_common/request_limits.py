"""Limits of a GenerateRequest that clients check before sending and the server enforces."""

from __future__ import annotations

# GenerateRequest.request_id: at most this many characters (generation.proto says so).
MAX_REQUEST_ID_CHARS = 128
