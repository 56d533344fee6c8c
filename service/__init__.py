"""The speculative-decoding inference service."""

__version__ = "0.1.0"
