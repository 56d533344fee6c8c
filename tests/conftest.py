"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from specdec_common.logging_setup import configured_handlers


@pytest.fixture(autouse=True)
def restore_the_logging_handler() -> Iterator[None]:
    """A test that starts an entry point in-process (telemetry's main, say) has
    configure_logging attach a handler to the sys.stderr of that moment, which under capsys
    is a stream pytest closes when the test ends: every later line logged through the root
    logger, from any thread of a later test, would fail with "I/O operation on closed file".
    After each test, configure_logging's handler is the one from before the test (pytest's
    own capture handlers are left alone)."""
    before = configured_handlers()
    yield
    root = logging.getLogger()
    for handler in configured_handlers():
        if handler not in before:
            root.removeHandler(handler)
    for handler in before:
        if handler not in root.handlers:
            root.addHandler(handler)
