"""Speculation: the drafters, verification, sampling and the draft-length policy."""
